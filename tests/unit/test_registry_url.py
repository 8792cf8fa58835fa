"""URL normalisation: each accepted form and each rule that rejects one."""

from __future__ import annotations

import pytest

from broker.core.registry_url import InvalidRegistryUrl, RegistryLocation, parse_registry_url

ACCEPTED = [
    # url, registry, repository prefix, plain http
    ("gcr.io", "gcr.io", "", False),
    ("GCR.io", "gcr.io", "", False),
    ("https://gcr.io", "gcr.io", "", False),
    ("HTTPS://gcr.io/", "gcr.io", "", False),
    ("https://index.docker.io/v1/", "docker.io", "", False),
    ("index.docker.io", "docker.io", "", False),
    ("registry-1.docker.io", "docker.io", "", False),
    ("docker.io", "docker.io", "", False),
    ("https://registry-1.docker.io/v2/", "docker.io", "", False),
    ("docker.io/acme", "docker.io", "acme", False),
    ("registry.example.org:5000", "registry.example.org:5000", "", False),
    ("http://127.0.0.1:5000", "127.0.0.1:5000", "", True),
    ("http://127.0.0.1:5000/", "127.0.0.1:5000", "", True),
    ("localhost", "localhost", "", False),
    ("localhost:5000", "localhost:5000", "", False),
    ("myregistry:5000", "myregistry:5000", "", False),
    ("ghcr.io/acme", "ghcr.io", "acme", False),
    ("ghcr.io/acme/", "ghcr.io", "acme", False),
    ("https://ghcr.io/acme/team-a/tools", "ghcr.io", "acme/team-a/tools", False),
    ("ghcr.io/a.b_c__d-e--f", "ghcr.io", "a.b_c__d-e--f", False),
    ("[::1]:5000", "[::1]:5000", "", False),
    ("http://[0:0:0:0:0:0:0:1]:5000", "[::1]:5000", "", True),
    ("reg.example.com:05000", "reg.example.com:5000", "", False),
]


@pytest.mark.parametrize(("url", "registry", "prefix", "plain_http"), ACCEPTED)
def test_accepted_urls_normalise(url: str, registry: str, prefix: str, plain_http: bool) -> None:
    assert parse_registry_url(url) == RegistryLocation(registry, prefix, plain_http)


def test_docker_hub_aliases_share_one_claim() -> None:
    claims = {
        parse_registry_url(u).claim
        for u in (
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        )
    }
    assert claims == {"docker.io"}


def test_scheme_does_not_change_the_claim() -> None:
    assert parse_registry_url("http://reg.io:5000").claim == parse_registry_url("reg.io:5000").claim


REJECTED = [
    ("", "is required"),
    ("ftp://gcr.io", "scheme must be http:// or https://"),
    ("https://", "must name a registry host"),
    ("https://user:pw@gcr.io", "must not contain credentials"),
    ("gcr.io?x=1", "query or fragment"),
    ("gcr.io#frag", "query or fragment"),
    ("gcr .io", "whitespace"),
    (" gcr.io", "whitespace"),
    ("gcr.io\n", "whitespace"),
    ("myregistry", "must contain '.' or a ':port'"),
    ("reg.io:0", "port must be a number from 1 to 65535"),
    ("reg.io:65536", "port must be a number from 1 to 65535"),
    ("reg.io:http", "port must be a number from 1 to 65535"),
    ("-reg.io", "host must be a DNS name"),
    ("reg_io.com", "host must be a DNS name"),
    ("::1", "IPv6 addresses must be written in brackets"),
    ("[::1", "must be closed"),
    ("[zz::1]:5000", "not a valid IPv6 address"),
    ("[::1]x", "only a :port may follow"),
    ("reg.io//acme", "empty components"),
    ("reg.io/Acme", "path components must be lowercase"),
    ("reg.io/acme_", "path components must be lowercase"),
    ("reg.io/a___b", "path components must be lowercase"),
    ("x" * 600 + ".io", "at most 512 characters"),
]


@pytest.mark.parametrize(("url", "rule"), REJECTED)
def test_rejected_urls_name_the_rule(url: str, rule: str) -> None:
    with pytest.raises(InvalidRegistryUrl, match=None) as caught:
        parse_registry_url(url)
    assert rule in str(caught.value)


def test_credentials_in_url_are_not_echoed() -> None:
    with pytest.raises(InvalidRegistryUrl) as caught:
        parse_registry_url("https://robot:hunter2@gcr.io")
    assert "hunter2" not in str(caught.value)
