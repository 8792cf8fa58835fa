"""ImageHostService: validate the request, call the catalog, convert the result."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import grpc
from google.protobuf import duration_pb2, empty_pb2

from broker.api.context import actor_of
from broker.api.convert import host_fields_from_proto, image_host_to_proto
from broker.core.connection_test import Candidate, ConnectionTester
from broker.core.errors import FieldViolation, InvalidArgument
from broker.core.image_hosts import MUTABLE_FIELDS, ImageHostCatalog, resource_name_to_id
from broker.core.secrets import Secret
from broker.v1 import image_hosts_pb2, image_hosts_pb2_grpc


@contextlib.contextmanager
def _fields_of(message_field: str) -> Iterator[None]:
    """Name host field violations by their path in the request (image_host.url)."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(
            [
                FieldViolation(f"{message_field}.{v.field}", v.description)
                if v.field in MUTABLE_FIELDS
                else v
                for v in exc.violations
            ],
            reason=exc.reason,
        ) from None


def _require_host(
    request: image_hosts_pb2.CreateImageHostRequest | image_hosts_pb2.UpdateImageHostRequest,
) -> None:
    if not request.HasField("image_host"):
        raise InvalidArgument.single("image_host", "is required")


class ImageHostServicer(image_hosts_pb2_grpc.ImageHostServiceServicer):
    def __init__(self, catalog: ImageHostCatalog, tester: ConnectionTester) -> None:
        self._catalog = catalog
        self._tester = tester

    def CreateImageHost(
        self, request: image_hosts_pb2.CreateImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ImageHost:
        _require_host(request)
        with _fields_of("image_host"):
            host = self._catalog.create(
                request.image_host_id, host_fields_from_proto(request.image_host), actor_of(context)
            )
        return image_host_to_proto(host)

    def GetImageHost(
        self, request: image_hosts_pb2.GetImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ImageHost:
        return image_host_to_proto(
            self._catalog.get(resource_name_to_id(request.name), actor_of(context))
        )

    def ListImageHosts(
        self, request: image_hosts_pb2.ListImageHostsRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ListImageHostsResponse:
        page = self._catalog.list_page(request.page_size, request.page_token, actor_of(context))
        return image_hosts_pb2.ListImageHostsResponse(
            image_hosts=[image_host_to_proto(h) for h in page.hosts],
            next_page_token=page.next_page_token,
        )

    def UpdateImageHost(
        self, request: image_hosts_pb2.UpdateImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ImageHost:
        _require_host(request)
        host = request.image_host
        image_host_id = resource_name_to_id(host.name, "image_host.name")
        paths = list(request.update_mask.paths)
        if paths == ["*"]:
            mask = list(MUTABLE_FIELDS)
        elif paths:
            mask = paths
        else:
            # AIP-134: no mask means every field the request populates.
            mask = [f for f in MUTABLE_FIELDS if getattr(host, f)]
        with _fields_of("image_host"):
            updated = self._catalog.update(
                image_host_id, host_fields_from_proto(host), mask, host.etag, actor_of(context)
            )
        return image_host_to_proto(updated)

    def DeleteImageHost(
        self, request: image_hosts_pb2.DeleteImageHostRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._catalog.delete(resource_name_to_id(request.name), request.etag, actor_of(context))
        return empty_pb2.Empty()

    def SetDefaultImageHost(
        self, request: image_hosts_pb2.SetDefaultImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ImageHost:
        host = self._catalog.set_default(
            resource_name_to_id(request.name), request.reason, request.etag, actor_of(context)
        )
        return image_host_to_proto(host)

    def GetDefaultImageHost(
        self, request: image_hosts_pb2.GetDefaultImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.ImageHost:
        return image_host_to_proto(self._catalog.get_default(actor_of(context)))

    def TestImageHost(
        self, request: image_hosts_pb2.TestImageHostRequest, context: grpc.ServicerContext
    ) -> image_hosts_pb2.TestImageHostResponse:
        candidate = (
            Candidate(request.candidate_username, Secret(request.candidate_access_token))
            if request.use_candidate_credentials
            else None
        )
        result = self._tester.test(resource_name_to_id(request.name), candidate, actor_of(context))
        latency = duration_pb2.Duration()
        latency.FromTimedelta(datetime.timedelta(seconds=result.latency))
        return image_hosts_pb2.TestImageHostResponse(
            result=f"TEST_IMAGE_HOST_RESULT_{result.result}",
            message=result.message,
            auth_scheme=result.auth_scheme,
            endpoint=result.endpoint,
            latency=latency,
        )
