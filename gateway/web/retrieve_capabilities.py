"""The Retrieve Capabilities transaction (PS3.18 8.9, Annex H): ``OPTIONS`` on a
DICOMweb root answers a WADL document of the resources and methods served there.

PS3.18 requires it of every RESTful service; clients and integration engines use it to
discover what an origin server implements. The document is built from the facade's
own routes, so it cannot promise a resource the gateway does not serve nor leave one
out; each method carries its PS3.18 transaction name and the media types the facade
answers it with. What would only be refused is left out: stores and deletions of a
read-only facade (405), deletions an archive has said it cannot do (501).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.mediatypes import DICOM, DICOM_JSON, DICOM_XML, FRAME_MEDIA_TYPES, JSON, OCTET_STREAM, multipart_accept
from gateway.web.common import text_error
from gateway.web.keys import CONFIG, UPSTREAM

WADL = "application/vnd.sun.wadl+xml"
WADL_NS = "http://wadl.dev.java.net/2009/02"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
XML_TYPES = (WADL, "application/xml", "text/xml")
ET.register_namespace("", WADL_NS)
# Methods a route answers that are not transactions of its resource.
_NOT_TRANSACTIONS = frozenset({"HEAD", "OPTIONS"})

_SEARCH = ((), (DICOM_JSON, multipart_accept(DICOM_XML)))
_METADATA = ((), (DICOM_JSON, multipart_accept(DICOM_XML)))
_INSTANCES = ((), (multipart_accept(DICOM), multipart_accept(OCTET_STREAM)))
_RENDERED = ((), ("image/jpeg", "image/png", "image/gif"))
_STORE = ((multipart_accept(DICOM), multipart_accept(DICOM_JSON), multipart_accept(DICOM_XML), DICOM), (DICOM_JSON, DICOM_XML))
_DELETE: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

# (path under the root, with its template names; method) -> (transaction, (request
# media types, response media types)). PS3.18's names; DELETE (Azure's, dcm4chee's)
# and PUT (Azure's upsert) have none there, and are named alike.
TRANSACTIONS: dict[tuple[str, str], tuple[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    ("studies", "GET"): ("SearchForStudies", _SEARCH),
    ("studies", "POST"): ("StoreInstances", _STORE),
    ("studies", "PUT"): ("UpsertInstances", _STORE),
    ("series", "GET"): ("SearchForSeries", _SEARCH),
    ("instances", "GET"): ("SearchForInstances", _SEARCH),
    ("studies/{study}", "GET"): ("RetrieveStudy", _INSTANCES),
    ("studies/{study}", "POST"): ("StoreStudyInstances", _STORE),
    ("studies/{study}", "PUT"): ("UpsertStudyInstances", _STORE),
    ("studies/{study}", "DELETE"): ("DeleteStudy", _DELETE),
    ("studies/{study}/metadata", "GET"): ("RetrieveStudyMetadata", _METADATA),
    ("studies/{study}/rendered", "GET"): ("RetrieveRenderedStudy", _RENDERED),
    ("studies/{study}/thumbnail", "GET"): ("RetrieveStudyThumbnail", _RENDERED),
    ("studies/{study}/series", "GET"): ("SearchForStudySeries", _SEARCH),
    ("studies/{study}/instances", "GET"): ("SearchForStudyInstances", _SEARCH),
    ("studies/{study}/series/{series}", "GET"): ("RetrieveSeries", _INSTANCES),
    ("studies/{study}/series/{series}", "DELETE"): ("DeleteSeries", _DELETE),
    ("studies/{study}/series/{series}/metadata", "GET"): ("RetrieveSeriesMetadata", _METADATA),
    ("studies/{study}/series/{series}/rendered", "GET"): ("RetrieveRenderedSeries", _RENDERED),
    ("studies/{study}/series/{series}/thumbnail", "GET"): ("RetrieveSeriesThumbnail", _RENDERED),
    ("studies/{study}/series/{series}/instances", "GET"): ("SearchForStudySeriesInstances", _SEARCH),
    ("studies/{study}/series/{series}/instances/{instance}", "GET"): ("RetrieveInstance", ((), (DICOM, *_INSTANCES[1]))),
    ("studies/{study}/series/{series}/instances/{instance}", "DELETE"): ("DeleteInstance", _DELETE),
    ("studies/{study}/series/{series}/instances/{instance}/metadata", "GET"): ("RetrieveInstanceMetadata", _METADATA),
    ("studies/{study}/series/{series}/instances/{instance}/rendered", "GET"): ("RetrieveRenderedInstance", _RENDERED),
    ("studies/{study}/series/{series}/instances/{instance}/thumbnail", "GET"): ("RetrieveInstanceThumbnail", _RENDERED),
    ("studies/{study}/series/{series}/instances/{instance}/frames/{frames}", "GET"): (
        "RetrieveFrames", ((), tuple(multipart_accept(media) for media in (OCTET_STREAM, *FRAME_MEDIA_TYPES))),
    ),
    ("studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered", "GET"): ("RetrieveRenderedFrames", _RENDERED),
    ("studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail", "GET"): ("RetrieveFramesThumbnail", _RENDERED),
    ("studies/{study}/series/{series}/instances/{instance}/bulkdata/{tags}", "GET"): ("RetrieveBulkdata", ((), (multipart_accept(OCTET_STREAM),))),
}


def _refused(app: web.Application) -> frozenset[str]:
    """Methods every route would refuse now, whoever asks."""
    if app[CONFIG].http.read_only:
        return frozenset({"POST", "PUT", "DELETE"})
    if app[UPSTREAM].capabilities.delete is False:
        return frozenset({"DELETE"})
    return frozenset()


def _served(app: web.Application, root: str) -> dict[str, list[str]]:
    """Each path the app serves under ``root`` (a route's template, e.g. ``/v1`` or
    ``/datastore/{datastoreId}``), relative to it, with its transactions' methods."""
    served: dict[str, list[str]] = {}
    left_out = _NOT_TRANSACTIONS | _refused(app)
    for resource in app.router.resources():
        canonical = resource.canonical
        if not canonical.startswith(root + "/") or canonical.endswith("/"):
            continue  # another root's, or the trailing-slash twin of a path listed
        methods = [route.method for route in resource if route.method not in left_out]
        if methods:
            served.setdefault(canonical[len(root) + 1 :], []).extend(methods)
    return served


def _wadl(base: str, served: dict[str, list[str]]) -> ET.Element:
    """The WADL tree: one ``resource`` per path segment, nested; a template segment
    carries its ``param``; each method its transaction name and media types."""
    application = ET.Element(f"{{{WADL_NS}}}application")
    resources = ET.SubElement(application, f"{{{WADL_NS}}}resources", base=base)
    nodes: dict[str, ET.Element] = {}
    for path in sorted(served):
        parent, walked = resources, ""
        for segment in path.split("/"):
            walked = f"{walked}/{segment}" if walked else segment
            node = nodes.get(walked)
            if node is None:
                node = nodes[walked] = ET.SubElement(parent, f"{{{WADL_NS}}}resource", path=segment)
                if segment.startswith("{"):
                    ET.SubElement(node, f"{{{WADL_NS}}}param", name=segment.strip("{}"), style="template", type="xsd:string", required="true")
            parent = node
        for method in sorted(set(served[path])):
            _method(parent, path, method)
    return application


def _method(resource: ET.Element, path: str, method: str) -> None:
    known = TRANSACTIONS.get((path, method))
    element = ET.SubElement(resource, f"{{{WADL_NS}}}method", name=method)
    if known is None:
        return
    name, (takes, answers) = known
    element.set("id", name)
    if takes:
        request = ET.SubElement(element, f"{{{WADL_NS}}}request")
        for media in takes:
            ET.SubElement(request, f"{{{WADL_NS}}}representation", mediaType=media)
    response = ET.SubElement(element, f"{{{WADL_NS}}}response", status="204" if method == "DELETE" else "200")
    for media in answers:
        ET.SubElement(response, f"{{{WADL_NS}}}representation", mediaType=media)


def _as_json(element: ET.Element) -> dict[str, Any]:
    """The same tree as JSON: an element's attributes as members, its children as
    lists under their element names."""
    out: dict[str, Any] = dict(element.attrib)
    for child in element:
        out.setdefault(child.tag.rsplit("}", 1)[-1], []).append(_as_json(child))
    return out


def _handler(root: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def capabilities(request: web.Request) -> web.Response:
        chosen = None
        for media_range in parse_accept(request.headers.get("Accept")):
            chosen = next((media for media in (*XML_TYPES, JSON) if media_range.matches(media)), None)
            if chosen is not None:
                break
        if chosen is None:
            return text_error(406, f"the capabilities are described as {WADL} (or {JSON})")
        base = f"{request.scheme}://{request.host}{request.path.rstrip('/')}/"
        document = _wadl(base, _served(request.app, root))
        headers = {"Vary": "Accept"}
        if chosen == JSON:
            return web.Response(body=json.dumps({"application": _as_json(document)}).encode(), content_type=JSON, headers=headers)
        document.set("xmlns:xsd", XSD_NS)  # for the params' type="xsd:string"
        body = ET.tostring(document, encoding="utf-8", xml_declaration=True)
        return web.Response(body=body, content_type=chosen, charset="utf-8", headers=headers)

    return capabilities


def add_routes(router: Any, prefix: str) -> None:
    """OPTIONS on the root ``prefix`` (with and without its trailing slash; the
    server's own root when the base path is ``/``)."""
    if prefix:
        router.add("OPTIONS", prefix, _handler(prefix))
    else:
        router.router.add_route("OPTIONS", "/", _handler(prefix))
