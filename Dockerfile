FROM python:3.11-slim
RUN useradd --system --home /var/lib/dicom-gateway dicom-gateway \
    && mkdir -p /var/lib/dicom-gateway /etc/dicom-gateway \
    && chown dicom-gateway /var/lib/dicom-gateway
WORKDIR /opt/dicom-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir .
COPY config/gateway.toml /etc/dicom-gateway/gateway.toml
# In a container the spool lives on the volume; override the relative default. HTTP
# listens on every interface there, so the facade needs a token: set GW_TOKEN.
RUN sed -i 's|^directory = .*|directory = "/var/lib/dicom-gateway"|; s|^host = "127.0.0.1"  *# /healthz|host = "0.0.0.0"              # /healthz|; s|^# bearer_tokens = |bearer_tokens = |' /etc/dicom-gateway/gateway.toml
USER dicom-gateway
VOLUME /var/lib/dicom-gateway
EXPOSE 11112 8080
STOPSIGNAL SIGTERM
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=5)"
ENTRYPOINT ["dicom-gateway"]
CMD ["run", "--config", "/etc/dicom-gateway/gateway.toml"]
