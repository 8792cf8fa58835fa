"""Conversions between domain objects and broker.v1 messages."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from broker.core.image_hosts import HostFields, ImageHost
from broker.core.secrets import Secret
from broker.v1 import image_hosts_pb2


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(dt.UTC))
    return stamp


def image_host_to_proto(host: ImageHost) -> image_hosts_pb2.ImageHost:
    """The public view of a host: everything but the access token."""
    return image_hosts_pb2.ImageHost(
        name=host.name,
        display_name=host.display_name,
        url=host.url,
        registry=host.location.registry,
        repository_prefix=host.location.repository_prefix,
        plain_http=host.location.plain_http,
        username=host.username,
        access_token_set=bool(host.access_token),
        default=host.is_default,
        create_time=timestamp(host.create_time),
        update_time=timestamp(host.update_time),
        etag=host.etag,
    )


def host_fields_from_proto(message: image_hosts_pb2.ImageHost) -> HostFields:
    return HostFields(
        display_name=message.display_name,
        url=message.url,
        username=message.username,
        access_token=Secret(message.access_token),
    )
