"""Image references: each accepted form, each rule that rejects one, and resolution helpers.

The tables pin the broker's normalised form; the differential test at the end
checks `parse_reference` against a literal transcription of distribution/reference's
`ParseNormalizedNamed` (plus go-digest's checks) on generated strings.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.core.references import (
    MAX_REFERENCE_LENGTH,
    ImageReference,
    InvalidReference,
    parse_reference,
)
from broker.core.registry_url import parse_registry_url

H64 = "0123456789abcdef" * 4
H96 = "fedcba9876543210" * 6
H128 = "0123456789abcdef" * 8
SHA = f"sha256:{H64}"

# -- accepted references ------------------------------------------------------

ACCEPTED = [
    # text, fully qualified form, qualified
    ("ubuntu", "docker.io/library/ubuntu:latest", False),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", False),
    ("team/tool", "docker.io/team/tool:latest", False),
    ("team/tool:1.0", "docker.io/team/tool:1.0", False),
    ("team/sub/tool:1", "docker.io/team/sub/tool:1", False),
    ("library/ubuntu", "docker.io/library/ubuntu:latest", False),
    ("a-b--c/d", "docker.io/a-b--c/d:latest", False),
    ("docker.io/ubuntu", "docker.io/library/ubuntu:latest", True),
    ("docker.io/library/ubuntu:20.04", "docker.io/library/ubuntu:20.04", True),
    ("docker.io/library/a/b", "docker.io/library/a/b:latest", True),
    ("index.docker.io/ubuntu", "docker.io/library/ubuntu:latest", True),
    ("index.docker.io/team/tool:1", "docker.io/team/tool:1", True),
    # The broker's Docker Hub aliases, in any case (distribution keeps these hosts).
    ("registry-1.docker.io/ubuntu", "docker.io/library/ubuntu:latest", True),
    ("Index.Docker.IO/team/tool", "docker.io/team/tool:latest", True),
    # With a port it is another endpoint: no alias, no library/.
    ("docker.io:443/ubuntu", "docker.io:443/ubuntu:latest", True),
    ("ghcr.io/acme/app", "ghcr.io/acme/app:latest", True),
    ("GHCR.io/acme/app:V1", "ghcr.io/acme/app:V1", True),
    ("ghcr.io/ubuntu", "ghcr.io/ubuntu:latest", True),
    ("localhost/app", "localhost/app:latest", True),
    ("localhost:5000/app:dev", "localhost:5000/app:dev", True),
    ("LocalHost/app", "localhost/app:latest", True),
    ("myregistry:5000/app", "myregistry:5000/app:latest", True),
    ("reg.example.com:05000/x", "reg.example.com:5000/x:latest", True),
    ("reg.io:99999/x", "reg.io:99999/x:latest", True),
    ("127.0.0.1:5000/team/tool:1.0", "127.0.0.1:5000/team/tool:1.0", True),
    ("1.2.3.4/x", "1.2.3.4/x:latest", True),
    ("[::1]:5000/x", "[::1]:5000/x:latest", True),
    ("[0:0:0:0:0:0:0:1]/x", "[::1]/x:latest", True),
    ("[2001:DB8::1]:443/a/b", "[2001:db8::1]:443/a/b:latest", True),
    ("[::ffff:7f00:1]:5000/x", "[::ffff:7f00:1]:5000/x:latest", True),
    # Uppercase makes the first component a host; lowercased, `Foo` would be a namespace.
    ("Foo/bar", "Foo/bar:latest", True),
    ("FOO.io/bar", "foo.io/bar:latest", True),
    ("Foo:5000/bar", "foo:5000/bar:latest", True),
    # Without a '/', nothing is a host: distribution reads these as Docker Hub names.
    ("localhost", "docker.io/library/localhost:latest", False),
    ("localhost:5000", "docker.io/library/localhost:5000", False),
    ("reg.io:5000", "docker.io/library/reg.io:5000", False),
    ("example.com", "docker.io/library/example.com:latest", False),
    ("a.b_c__d-e--f", "docker.io/library/a.b_c__d-e--f:latest", False),
    (f"sha256:{H64}", f"docker.io/library/sha256:{H64}", False),
    (f"{H64}:latest", f"docker.io/library/{H64}:latest", False),
    (H64[:63], f"docker.io/library/{H64[:63]}:latest", False),
    ("reg.io/a.b_c__d-e--f/x", "reg.io/a.b_c__d-e--f/x:latest", True),
    # Digests: no default tag next to one; a tag and a digest are both kept.
    (f"ubuntu@{SHA}", f"docker.io/library/ubuntu@{SHA}", False),
    (f"ubuntu:22.04@{SHA}", f"docker.io/library/ubuntu:22.04@{SHA}", False),
    (f"ghcr.io/acme/app@sha512:{H128}", f"ghcr.io/acme/app@sha512:{H128}", True),
    (f"ghcr.io/acme/app:1@sha384:{H96}", f"ghcr.io/acme/app:1@sha384:{H96}", True),
    # Tags: \w first, then \w . - ; case is kept; up to 128 characters.
    ("ubuntu:Latest_1.0-rc", "docker.io/library/ubuntu:Latest_1.0-rc", False),
    ("ubuntu:_x", "docker.io/library/ubuntu:_x", False),
    ("ubuntu:" + "t" * 128, "docker.io/library/ubuntu:" + "t" * 128, False),
    # Repository names up to 255 characters, counted with library/.
    ("x/" + "y" * 253, "docker.io/x/" + "y" * 253 + ":latest", False),
    ("z" * 247, "docker.io/library/" + "z" * 247 + ":latest", False),
    ("reg.io/" + "y" * 255, "reg.io/" + "y" * 255 + ":latest", True),
]


@pytest.mark.parametrize(("text", "expected", "qualified"), ACCEPTED)
def test_accepted_references_normalise(text: str, expected: str, qualified: bool) -> None:
    ref = parse_reference(text)
    assert (ref.fully_qualified, ref.qualified) == (expected, qualified)
    assert str(ref) == expected
    # The fully qualified form names the same image, now qualified.
    assert parse_reference(expected) == replace(ref, qualified=True, path=ref.repository)


FIELDS = [
    # text, registry, repository, tag, digest, path
    ("ubuntu", "docker.io", "library/ubuntu", "latest", "", "ubuntu"),
    ("team/tool:1", "docker.io", "team/tool", "1", "", "team/tool"),
    ("library/ubuntu", "docker.io", "library/ubuntu", "latest", "", "library/ubuntu"),
    (f"ubuntu@{SHA}", "docker.io", "library/ubuntu", "", SHA, "ubuntu"),
    ("docker.io/ubuntu:1", "docker.io", "library/ubuntu", "1", "", "library/ubuntu"),
    ("[::1]:5000/x:t", "[::1]:5000", "x", "t", "", "x"),
    (f"ghcr.io/acme/app:2@{SHA}", "ghcr.io", "acme/app", "2", SHA, "acme/app"),
    ("localhost:5000", "docker.io", "library/localhost", "5000", "", "localhost"),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "path"), FIELDS)
def test_fields(
    text: str, registry: str, repository: str, tag: str, digest: str, path: str
) -> None:
    assert parse_reference(text) == ImageReference(
        registry=registry,
        repository=repository,
        tag=tag,
        digest=digest,
        qualified=parse_reference(text).qualified,
        path=path,
    )


# -- rejected references ------------------------------------------------------

REJECTED = [
    # text, the rule the message must name
    ("", "reference is empty"),
    (" ubuntu", "whitespace"),
    ("ubu ntu", "whitespace"),
    ("ubuntu\n", "whitespace"),
    ("ubuntu\x00", "control"),
    ("ub\u00fcntu", "non-ASCII"),
    ("a" * (MAX_REFERENCE_LENGTH + 1), f"at most {MAX_REFERENCE_LENGTH} characters"),
    ("Ubuntu", "repository name must be lowercase"),
    ("team/Tool", "repository name must be lowercase"),
    ("ghcr.io/Acme/app", "repository name must be lowercase"),
    ("foo/Bar:tag", "repository name must be lowercase"),
    (H64, "cannot specify 64-byte hexadecimal strings"),
    ("https://ghcr.io/acme/app", "must not include a scheme (https://)"),
    ("http://reg.io/x", "must not include a scheme (https://)"),
    ("a___b/c", "components must be lowercase letters and digits"),
    ("reg.io/a..b", "components must be lowercase letters and digits"),
    ("reg.io/-a", "components must be lowercase letters and digits"),
    ("reg.io/a-", "components must be lowercase letters and digits"),
    ("ubuntu:tag:tag", "components must be lowercase letters and digits"),
    ("-docker.io/x", "registry host must be a DNS name"),
    ("a_b.c/d", "registry host must be a DNS name"),
    ("::1/x", "registry host must be a DNS name"),
    ("[::1/x", "registry host must be a DNS name"),
    ("[zz::1]:5000/x", "registry host must be a DNS name"),
    ("[1:2:3]/x", "not a valid IPv6 address"),
    ("reg.io:abc/x", "registry port must be digits"),
    ("reg.io:/x", "registry port must be digits"),
    ("reg.io//x", "must not have empty components"),
    ("reg.io/x/", "must not have empty components"),
    ("/ubuntu", "must not have empty components"),
    ("docker.io/", "must not have empty components"),
    ("ubuntu:-bad", "invalid tag"),
    ("ubuntu:.bad", "invalid tag"),
    ("ubuntu:", "invalid tag"),
    ("ubuntu:a+b", "invalid tag"),
    ("ubuntu:" + "t" * 129, "invalid tag: must be at most 128 characters"),
    ("ubuntu@sha256:abc", "invalid digest"),
    ("ubuntu@", "invalid digest"),
    (f"ubuntu@{SHA}:x", "invalid digest"),
    (f"ubuntu@sha256:{H64[:63]}", "sha256 needs exactly 64 lowercase hex digits"),
    (f"ubuntu@sha256:{H64}0", "sha256 needs exactly 64 lowercase hex digits"),
    (f"ubuntu@sha256:{H64.upper()}", "sha256 needs exactly 64 lowercase hex digits"),
    (f"ubuntu@sha512:{H64}", "sha512 needs exactly 128 lowercase hex digits"),
    (f"ubuntu@md5:{H64[:32]}", "unsupported digest algorithm"),
    (f"ubuntu@SHA256:{H64}", "unsupported digest algorithm"),
    (f"ubuntu@{SHA}@{SHA}", "only one '@digest'"),
    (":tag", "repository name is missing"),
    (f"@{SHA}", "repository name is missing"),
    ("x/" + "y" * 254, "repository name must not be more than 255 characters"),
    ("z" * 248, "repository name must not be more than 255 characters"),
    ("index.docker.io/" + "z" * 248, "repository name must not be more than 255 characters"),
]


@pytest.mark.parametrize(("text", "rule"), REJECTED)
def test_rejected_references_name_the_rule(text: str, rule: str) -> None:
    with pytest.raises(InvalidReference, match=re.escape(rule)):
        parse_reference(text)


def test_invalid_reference_is_a_value_error() -> None:
    assert issubclass(InvalidReference, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "user:Pw-s3cret@reg.io/x",
        "reg.io/x@Pw-s3cret",
        "Pw-s3cret:Pw-s3cret@ghcr.io/acme/app",
        "https://user:Pw-s3cret@reg.io/x",
    ],
)
def test_errors_never_repeat_the_input(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert "s3cret" not in str(info.value)


# -- familiar form ------------------------------------------------------------

FAMILIAR = [
    ("ubuntu", "ubuntu:latest"),
    ("docker.io/library/ubuntu:1", "ubuntu:1"),
    ("index.docker.io/team/tool", "team/tool:latest"),
    ("docker.io/library/a/b", "library/a/b:latest"),
    (f"ubuntu:1@{SHA}", f"ubuntu:1@{SHA}"),
    (f"ubuntu@{SHA}", f"ubuntu@{SHA}"),
    (f"ghcr.io/acme/app@{SHA}", f"ghcr.io/acme/app@{SHA}"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("docker.io:443/x", "docker.io:443/x:latest"),
    ("Foo/bar", "Foo/bar:latest"),
]


@pytest.mark.parametrize(("text", "familiar"), FAMILIAR)
def test_familiar_form(text: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert ref.familiar == familiar
    again = parse_reference(familiar)
    assert again.fully_qualified == ref.fully_qualified
    # Familiar Docker Hub names are unqualified: they would resolve to the default host.
    assert again.qualified == (ref.registry != "docker.io")


# -- resolution helpers -------------------------------------------------------

ON_REGISTRY = [
    # text, registry, fully qualified result
    ("team/tool:1.0", "127.0.0.1:5000", "127.0.0.1:5000/team/tool:1.0"),
    ("ubuntu", "docker.io", "docker.io/library/ubuntu:latest"),
    ("ubuntu", "ghcr.io", "ghcr.io/ubuntu:latest"),
    ("ubuntu", "index.docker.io", "docker.io/library/ubuntu:latest"),
    ("ubuntu", "GHCR.IO", "ghcr.io/ubuntu:latest"),
    ("ubuntu", "localhost:05000", "localhost:5000/ubuntu:latest"),
    ("ubuntu", "[::1]:5000", "[::1]:5000/ubuntu:latest"),
    ("ubuntu", "docker.io:443", "docker.io:443/ubuntu:latest"),
    ("library/ubuntu", "ghcr.io", "ghcr.io/library/ubuntu:latest"),
    ("team/tool", "docker.io", "docker.io/team/tool:latest"),
    (f"ubuntu@{SHA}", "reg.io", f"reg.io/ubuntu@{SHA}"),
    (f"a/b:c@{SHA}", "reg.io", f"reg.io/a/b:c@{SHA}"),
    ("localhost:5000", "reg.io", "reg.io/localhost:5000"),
]


@pytest.mark.parametrize(("text", "registry", "expected"), ON_REGISTRY)
def test_on_registry_places_an_unqualified_reference(
    text: str, registry: str, expected: str
) -> None:
    placed = parse_reference(text).on_registry(registry)
    assert placed.fully_qualified == expected
    assert placed.qualified
    assert placed == parse_reference(expected)


@pytest.mark.parametrize("text", ["docker.io/ubuntu", "ghcr.io/acme/app", "localhost/x", "Foo/bar"])
def test_on_registry_refuses_a_qualified_reference(text: str) -> None:
    with pytest.raises(ValueError, match="keeps its registry"):
        parse_reference(text).on_registry("127.0.0.1:5000")


@pytest.mark.parametrize(
    ("registry", "rule"),
    [
        ("ghcr.io/acme", "without a path"),
        ("notahost", "registry:"),
        ("", "registry:"),
        ("reg.io:0", "registry:"),
    ],
)
def test_on_registry_needs_a_registry_host(registry: str, rule: str) -> None:
    with pytest.raises(ValueError, match=re.escape(rule)):
        parse_reference("ubuntu").on_registry(registry)


def test_resolve_keeps_a_qualified_reference_and_places_an_unqualified_one() -> None:
    qualified = parse_reference("ghcr.io/acme/app:1")
    assert qualified.resolve("127.0.0.1:5000") is qualified
    assert parse_reference("docker.io/ubuntu").resolve("127.0.0.1:5000").registry == "docker.io"
    assert (
        parse_reference("team/tool:1.0").resolve("127.0.0.1:5000").fully_qualified
        == "127.0.0.1:5000/team/tool:1.0"
    )
    assert parse_reference("ubuntu").resolve("docker.io") == parse_reference(
        "docker.io/library/ubuntu:latest"
    )


IN_PREFIX = [
    # text, prefix, expected
    ("ghcr.io/acme/app", "acme", True),
    ("ghcr.io/acme/app", "acme/app", True),
    ("ghcr.io/acme/app", "", True),
    ("ghcr.io/acme/app", "acme/", True),
    ("ghcr.io/acme/app", "/acme", True),
    ("ghcr.io/acme/app", "acme2", False),
    ("ghcr.io/acme/app", "acm", False),
    ("ghcr.io/acme/app", "acme/ap", False),
    ("ghcr.io/acme/app", "acme/app/x", False),
    ("ghcr.io/acme/app", "app", False),
    ("ghcr.io/acme", "acme", True),
    ("ghcr.io/acme2/x", "acme", False),
    ("ghcr.io/acme-x/y", "acme", False),
    ("ubuntu", "library", True),
    ("ubuntu", "ubuntu", False),
    ("team/tool:1", "team", True),
]


@pytest.mark.parametrize(("text", "prefix", "expected"), IN_PREFIX)
def test_in_prefix_matches_whole_components(text: str, prefix: str, expected: bool) -> None:
    assert parse_reference(text).in_prefix(prefix) is expected


@pytest.mark.parametrize(
    "host",
    [
        "docker.io",
        "index.docker.io",
        "Index.Docker.IO",
        "registry-1.docker.io",
        "ghcr.io",
        "GCR.io",
        "localhost",
        "LocalHost:05000",
        "myregistry:5000",
        "127.0.0.1:5000",
        "[::1]:5000",
        "[0:0:0:0:0:0:0:1]",
        "[2001:DB8::1]:443",
        "[::ffff:7f00:1]:5000",
        "reg.example.com:05000",
    ],
)
def test_registry_matches_the_image_host_normalisation(host: str) -> None:
    assert parse_reference(f"{host}/x").registry == parse_registry_url(host).registry


# -- differential test against distribution/reference ---------------------------
# A literal transcription of regexp.go, normalize.go (ParseNormalizedNamed,
# splitDockerDomain), reference.go (Parse) and go-digest's Digest.Validate.

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_OPTIONAL_PORT = r"(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_NAME = _DOMAIN_NAME_COMPONENT + r"(?:\." + _DOMAIN_NAME_COMPONENT + r")*"
_HOST = f"(?:{_DOMAIN_NAME}|{_IPV6})"
_DOMAIN_AND_PORT = _HOST + _OPTIONAL_PORT
_PATH_COMPONENT = f"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_REMOTE_NAME = f"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_NAME = f"(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME}"
_ANCHORED_NAME = re.compile(f"(?:({_DOMAIN_AND_PORT})/)?({_REMOTE_NAME})", re.ASCII)
_REFERENCE = re.compile(f"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?", re.ASCII)
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")
_GO_DIGEST_SIZES = {"sha256": 64, "sha384": 96, "sha512": 128}


def _split_docker_domain(name: str) -> tuple[str, str, bool]:
    """normalize.go splitDockerDomain, plus whether the first component was taken as domain."""
    maybe_domain, sep, maybe_remote = name.partition("/")
    if not sep:
        return "docker.io", "library/" + name, False
    if (
        maybe_domain == "localhost"
        or any(c in maybe_domain for c in ".:")
        or maybe_domain.lower() != maybe_domain
    ):
        domain, remote, qualified = maybe_domain, maybe_remote, True
    else:
        domain, remote, qualified = "docker.io", name, False
    if maybe_domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remote:
        remote = "library/" + remote
    return domain, remote, qualified


def _distribution(text: str) -> tuple[str, str, str, str, bool] | None:
    """ParseNormalizedNamed: (domain, path, tag, digest, qualified), or None if invalid."""
    if _IDENTIFIER.fullmatch(text):
        return None
    domain, remainder, qualified = _split_docker_domain(text)
    if remainder.split(":", 1)[0].lower() != remainder.split(":", 1)[0]:
        return None
    match = _REFERENCE.fullmatch(f"{domain}/{remainder}")
    if match is None:
        return None
    name = _ANCHORED_NAME.fullmatch(match[1])
    assert name is not None
    domain, path = name[1] or "", name[2]
    if len(path) > 255:
        return None
    digest = match[3] or ""
    if digest:
        algorithm, _, encoded = digest.partition(":")
        size = _GO_DIGEST_SIZES.get(algorithm)
        if size is None or not re.fullmatch(f"[a-f0-9]{{{size}}}", encoded):
            return None
    return domain, path, match[2] or "", digest, qualified


def _expected(text: str) -> ImageReference | None:
    """What the broker makes of what distribution accepts, with the documented deviations."""
    parsed = _distribution(text)
    if parsed is None or len(text) > MAX_REFERENCE_LENGTH:
        return None
    domain, path, tag, digest, qualified = parsed
    if not domain:
        return None  # `my_org.io/app`: distribution drops the domain; the broker rejects it.
    host_and_port = re.fullmatch(r"(\[[^]]*\]|[^:]*)(?::([0-9]+))?", domain)
    assert host_and_port is not None
    host, port = host_and_port[1], host_and_port[2] or ""
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        mapped = address.ipv4_mapped
        host = (
            f"[::ffff:{int(mapped) >> 16:x}:{int(mapped) & 0xFFFF:x}]"
            if mapped
            else f"[{address.compressed}]"
        )
    elif port or "." in host or host.lower() == "localhost":
        host = host.lower()
    registry = f"{host}:{int(port)}" if port else host
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = "docker.io"
        if "/" not in path:
            path = "library/" + path
            if len(path) > 255:
                return None
    return ImageReference(
        registry=registry,
        repository=path,
        tag=tag or ("" if digest else "latest"),
        digest=digest,
        qualified=qualified,
        path=path if qualified else _name_as_written(text),
    )


def _name_as_written(text: str) -> str:
    name = text.partition("@")[0]
    if ":" in name.rpartition("/")[2]:
        name = name.rpartition(":")[0]
    return name


def _outcome(text: str) -> ImageReference | str:
    """The reference, or the message of the InvalidReference; any other exception escapes."""
    try:
        return parse_reference(text)
    except InvalidReference as exc:
        return str(exc)


_TOKENS = [
    "a",
    "z9",
    "ubuntu",
    "library",
    "A",
    "Foo",
    "-",
    "--",
    ".",
    "_",
    "__",
    "___",
    "/",
    "/",
    "//",
    ":",
    ":",
    "@",
    "5000",
    "05000",
    "localhost",
    "LocalHost",
    "docker.io",
    "index.docker.io",
    "Index.Docker.IO",
    "registry-1.docker.io",
    "[::1]",
    "[0:0::1]",
    "[zz]",
    "[1:2]",
    "[::ffff:7f00:1]",
    "ex.com",
    "1.2.3.4",
    "v1.0",
    "latest",
    "Tag",
    H64,
    H64[:40],
    f"sha256:{H64}",
    f"sha256:{H64[:40]}",
    f"sha384:{H96}",
    f"sha512:{H128}",
    f"SHA256:{H64}",
    f"sha256:{H64.upper()}",
    f"md5:{H64[:32]}",
    "y" * 130,
    " ",
    "\u00e9",
    "://",
]
_path = st.lists(
    st.from_regex(
        r"[a-z0-9]{1,3}(?:(?:[._]|__|-{1,2}|___|\.\.|[A-Z])[a-z0-9]{1,3}){0,2}", fullmatch=True
    ),
    min_size=1,
    max_size=3,
).map("/".join)
_grammar_like = st.builds(
    lambda registry, path, tag, digest: f"{registry}{path}{tag}{digest}",
    st.sampled_from(
        [
            "",
            "",
            "docker.io/",
            "Index.Docker.IO/",
            "localhost:5000/",
            "Foo/",
            "[::1]:05000/",
            "[1:2]/",
            "reg.io:x/",
            "my_org.io/",
            "ghcr.io/",
        ]
    ),
    _path,
    st.sampled_from(["", "", ":1.0", ":", ":-x", ":Latest", ":" + "t" * 128, ":" + "t" * 129]),
    st.sampled_from(
        [
            "",
            "",
            f"@sha256:{H64}",
            f"@sha512:{H128}",
            f"@sha256:{H64[:40]}",
            f"@md5:{H64[:32]}",
            "@",
        ]
    ),
)
_token_soup = st.lists(st.sampled_from(_TOKENS), min_size=0, max_size=8).map("".join)


@settings(max_examples=1500, deadline=None, database=None)
@given(st.one_of(_grammar_like, _token_soup))
@example("my_org.io/app")
@example("[1:2]/x")
@example("Index.Docker.IO/" + "z" * 250)
@example("localhost:5000")
@example(f"sha256:{H64}")
@example(H64)
def test_agrees_with_distribution_reference(text: str) -> None:
    expected = _expected(text)
    actual = _outcome(text)
    if isinstance(actual, str):
        assert expected is None, f"{text!r} rejected ({actual}), expected {expected}"
        assert actual, "an InvalidReference must name the rule"
        return
    assert expected is not None, f"{text!r} accepted as {actual}, distribution rejects it"
    assert actual == expected
    assert parse_reference(actual.fully_qualified) == replace(
        actual, qualified=True, path=actual.repository
    )
