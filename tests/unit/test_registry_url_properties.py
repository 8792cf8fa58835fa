"""Property tests of `parse_registry_url`: total, idempotent, normalised, discreet.

- total: for any text it returns a location or raises InvalidRegistryUrl, nothing else;
- idempotent: the normalised form (`registry/prefix`, `http://` kept for plain
  HTTP) parses to the very same location;
- normalised: `registry` is lowercase `host[:port]` that distribution/reference
  accepts as the first component of an image reference, with no scheme, path or
  credentials, and `repository_prefix` is a valid repository path;
- discreet: an error message never quotes the password of `user:password@`.
"""

from __future__ import annotations

import re
import string

from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.core.registry_url import (
    DOMAIN_COMPONENT,
    MAX_URL_LENGTH,
    PATH_COMPONENT,
    InvalidRegistryUrl,
    RegistryLocation,
    parse_registry_url,
)

SETTINGS = settings(max_examples=400, deadline=None, database=None)

# distribution/reference regexp.go: domain = host [":" port], where host is a
# domain name or a bracketed IPv6 address written in hex digits and colons.
_REFERENCE_DOMAIN_RE = re.compile(
    rf"(?:{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_REFERENCE_PATH_RE = re.compile(rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*")

# -- strategies ---------------------------------------------------------------

# Any text: unicode, control characters, NUL, and some very long strings.
any_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x7F)),
    st.builds(
        lambda unit, count: unit * count,
        st.text(min_size=1, max_size=3),
        st.integers(min_value=1, max_value=10_000),
    ),
)

schemes = st.sampled_from(["", "", "http://", "https://", "HTTP://", "HttpS://", "ftp://", "://"])
_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
dns_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.sampled_from(
        [
            "localhost",
            "LocalHost",
            "docker.io",
            "Index.Docker.IO",
            "registry-1.docker.io",
            "gcr.io",
            "127.0.0.1",
        ]
    ),
)
ipv6_hosts = st.builds(
    lambda address, form, zone: "[" + form(address) + zone + "]",
    st.ip_addresses(v=6),
    st.sampled_from([lambda a: a.compressed, lambda a: a.exploded, lambda a: a.exploded.upper()]),
    # RFC 6874 zone ids ("%eth0") are something operators do type.
    st.one_of(
        st.just(""),
        st.just(""),
        st.text(string.ascii_letters + string.digits, min_size=1, max_size=6).map("%{}".format),
    ),
)
ports = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=99_999).map(":{}".format),
    st.integers(min_value=1, max_value=65_535).map(":000{}".format),
)
_component = st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+){0,2}", fullmatch=True)
paths = st.one_of(
    st.just(""),
    st.just("/"),
    st.sampled_from(["/v1/", "/v2", "/v1", "/v2/acme", "/Acme", "//acme", "/a//b"]),
    st.lists(_component, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.lists(_component, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts) + "/"),
)
url_like = st.builds(
    lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
    schemes,
    st.one_of(dns_hosts, dns_hosts, ipv6_hosts),
    ports,
    paths,
)
any_url = st.one_of(url_like, url_like, any_text)


def _outcome(url: str) -> RegistryLocation | str:
    """The location, or the message of the InvalidRegistryUrl; any other exception escapes."""
    try:
        return parse_registry_url(url)
    except InvalidRegistryUrl as exc:
        return str(exc)


def _parse_or_none(url: str) -> RegistryLocation | None:
    outcome = _outcome(url)
    return outcome if isinstance(outcome, RegistryLocation) else None


# -- properties ---------------------------------------------------------------


@SETTINGS
@given(any_url)
@example("")
@example("\x00")
@example("https://")
@example("http://[")
@example("[::1")
@example("[]:5000")
@example("host:99999999999999999999")
@example("a" * (MAX_URL_LENGTH + 1))
@example("gcr.io/" + "a" * 300)
def test_only_invalid_registry_url_is_raised(url: str) -> None:
    outcome = _outcome(url)
    if isinstance(outcome, str):
        assert outcome, "an InvalidRegistryUrl must say which rule the URL breaks"


@SETTINGS
@given(url_like)
@example("https://index.docker.io/v1/")
@example("HTTP://LocalHost:05000/Team/")
@example("http://[::1]:5000/acme")
@example("http://[fe80::1%Eth0]:5000")
def test_normalised_location_parses_to_itself(url: str) -> None:
    location = _parse_or_none(url)
    if location is None:
        return
    normal = f"{location.registry}/{location.repository_prefix}"
    assert parse_registry_url(normal) == RegistryLocation(
        location.registry, location.repository_prefix, plain_http=False
    ), normal
    assert parse_registry_url(location.claim) == parse_registry_url(normal)
    assert parse_registry_url("https://" + normal) == parse_registry_url(normal)
    if location.plain_http:
        assert parse_registry_url("http://" + normal) == location


@SETTINGS
@given(url_like)
@example("Index.Docker.IO")
@example("http://[fe80::1%Eth0]:5000")
@example("[fe80::1%eth0]")
# Python 3.13 prints IPv4-mapped addresses dotted, which image references reject.
@example("[::ffff:1.2.3.4]:5000")
@example("[::ffff:102:304]")
def test_registry_is_a_lowercase_reference_domain(url: str) -> None:
    location = _parse_or_none(url)
    if location is None:
        return
    registry = location.registry
    assert registry == registry.lower(), f"registry {registry!r} of {url!r} is not lowercase"
    assert "://" not in registry
    assert "/" not in registry
    assert "@" not in registry
    assert _REFERENCE_DOMAIN_RE.fullmatch(registry), (
        f"registry {registry!r} of {url!r} is not a distribution/reference domain: "
        "an image reference could never name it"
    )
    if location.repository_prefix:
        assert _REFERENCE_PATH_RE.fullmatch(location.repository_prefix)
    assert location.plain_http == url.lower().startswith("http://")


@SETTINGS
@given(
    scheme=st.sampled_from(["", "http://", "https://", "HTTPS://", "oci://"]),
    user=st.one_of(st.just("user"), st.text(max_size=20)),
    # The marker keeps the password from being a word that the rules themselves use.
    password=st.one_of(st.text(min_size=1), any_text).map("Pw{}\u00a7".format),
    rest=st.one_of(st.sampled_from(["host", "gcr.io", "gcr.io:5000/acme", "[::1]", ""]), any_text),
)
@example(scheme="https://", user="user", password="pw", rest="host")
@example(scheme="https://", user="user", password="s3cr3t/x", rest="gcr.io")
@example(scheme="http://", user="", password="secret:5000", rest="localhost")
def test_errors_never_quote_the_password(scheme: str, user: str, password: str, rest: str) -> None:
    url = f"{scheme}{user}:{password}@{rest}"
    outcome = _outcome(url)
    # A URL with credentials in it is never accepted, so they are never stored.
    assert isinstance(outcome, str), f"{url!r} was accepted as {outcome!r}"
    assert password not in outcome, f"the error for {url!r} quotes the password: {outcome!r}"
    assert f"{user}:{password}" not in outcome


@SETTINGS
@given(any_url)
def test_accepted_urls_hold_no_credentials(url: str) -> None:
    location = _parse_or_none(url)
    if location is None:
        return
    assert "@" not in url, f"{url!r} carries userinfo yet was accepted as {location!r}"
    assert len(location.claim) <= MAX_URL_LENGTH
