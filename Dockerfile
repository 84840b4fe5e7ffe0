FROM python:3.11-slim
# A fixed numeric user, so volume ownership is the same on every host.
RUN useradd --system --uid 10001 --home /var/lib/dicom-gateway dicom-gateway \
    && mkdir -p /var/lib/dicom-gateway /etc/dicom-gateway \
    && chown 10001 /var/lib/dicom-gateway
WORKDIR /opt/dicom-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .
COPY config/container.toml /etc/dicom-gateway/gateway.toml
USER 10001
VOLUME /var/lib/dicom-gateway
EXPOSE 11112 8080
STOPSIGNAL SIGTERM
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=5)"]
ENTRYPOINT ["dicom-gateway"]
CMD ["run", "--config", "/etc/dicom-gateway/gateway.toml"]
