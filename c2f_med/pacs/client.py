"""A DICOMweb client from a server URL and credentials kept out of the command line.

Credentials come from the environment, never from arguments, so they stay out of shell history,
logs and provenance (``provenance.json`` records the command line):

- ``C2F_MED_DICOMWEB_TOKEN``: a bearer token (``Authorization: Bearer ...``), e.g. an OAuth access
  token of a Google-style healthcare endpoint;
- ``C2F_MED_DICOMWEB_USER`` and ``C2F_MED_DICOMWEB_PASSWORD``: HTTP basic authentication;
- ``C2F_MED_DICOMWEB_CREDENTIALS``: the path of a JSON file ``{"token": "..."}`` or
  ``{"username": "...", "password": "..."}`` (readable by its owner only, ideally);
- ``C2F_MED_DICOMWEB_CA_BUNDLE``: a CA bundle for HTTPS servers with a private certificate authority.

A URL with credentials in it (``https://user:password@host/...``) is refused. Every server problem
becomes a :class:`DicomWebError`: one line naming the URL (never credentials) and the problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import add_certs_to_session, create_session

from c2f_med.errors import InputError

__all__ = ["ENV_TOKEN", "ENV_USER", "ENV_PASSWORD", "ENV_CREDENTIALS", "ENV_CA_BUNDLE", "TIMEOUT",
           "DicomWebError", "SeriesRef", "is_dicomweb_url", "check_root", "session_from_environment", "connect",
           "server_call"]

ENV_TOKEN = "C2F_MED_DICOMWEB_TOKEN"
ENV_USER = "C2F_MED_DICOMWEB_USER"
ENV_PASSWORD = "C2F_MED_DICOMWEB_PASSWORD"
ENV_CREDENTIALS = "C2F_MED_DICOMWEB_CREDENTIALS"
ENV_CA_BUNDLE = "C2F_MED_DICOMWEB_CA_BUNDLE"
#: seconds to connect, seconds to wait for each read of an answer
TIMEOUT = (5.0, 60.0)

_SERIES_URL = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/?$")


class DicomWebError(InputError):
    """A DICOMweb server that cannot be reached or answers with an error: ``"<url>: <problem>"``."""


def is_dicomweb_url(value: object) -> bool:
    """Whether ``value`` is an ``http://`` or ``https://`` URL (rather than a local path)."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def check_root(url: str) -> str:
    """``url`` without a trailing slash, after checking it is an http(s) URL without credentials in it.

    Raises:
        InputError: not an http(s) URL, or user name / password inside it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(None, f"{url!r} is not a DICOMweb URL (expected http://host[:port]/path)")
    if parts.username is not None or parts.password is not None:
        raise InputError(None, f"credentials in a URL are not accepted ({parts.hostname}); set {ENV_USER} / "
                               f"{ENV_PASSWORD}, {ENV_TOKEN} or {ENV_CREDENTIALS} instead")
    return url.rstrip("/")


@dataclass(frozen=True)
class SeriesRef:
    """One series on a DICOMweb server: ``{root}/studies/{study}/series/{series}``."""

    root: str
    study: str
    series: str

    @classmethod
    def parse(cls, url: str) -> SeriesRef:
        """Split a series URL.

        Raises:
            InputError: the URL is not ``{root}/studies/{StudyInstanceUID}/series/{SeriesInstanceUID}``.
        """
        match = _SERIES_URL.match(url.strip())
        if match is None:
            raise InputError(None, f"{url}: not a DICOMweb series URL (expected "
                                   "{root}/studies/{StudyInstanceUID}/series/{SeriesInstanceUID})")
        return cls(check_root(match["root"]), match["study"], match["series"])

    @property
    def url(self) -> str:
        return f"{self.root}/studies/{self.study}/series/{self.series}"


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request; the token never shows in ``repr``."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"


def _credentials_file(path: str) -> dict[str, str]:
    file = Path(path).expanduser()
    try:
        content = json.loads(file.read_text())
    except OSError as err:
        raise InputError(file, f"credentials file cannot be read ({err.strerror or err})") from err
    except json.JSONDecodeError as err:
        raise InputError(file, 'credentials file is not JSON ({"token": ...} or {"username": ..., '
                               '"password": ...})') from err
    if not isinstance(content, dict) or not ({"token"} <= content.keys() or {"username", "password"} <= content.keys()):
        raise InputError(file, 'credentials file needs "token", or "username" and "password"')
    if os.name == "posix" and file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger(__name__).warning("%s: credentials file readable by others (chmod 600 it)", file)
    return {k: str(v) for k, v in content.items()}


def session_from_environment(environ: os._Environ | dict[str, str] | None = None) -> requests.Session:
    """A ``requests`` session authenticated from the environment (module docstring); none set -> anonymous.

    Raises:
        InputError: two kinds of credentials at once, a user without a password, an unreadable file.
    """
    env = os.environ if environ is None else environ
    found = {}
    if env.get(ENV_CREDENTIALS):
        found = _credentials_file(env[ENV_CREDENTIALS])
    if env.get(ENV_TOKEN):
        found = {**found, "token": env[ENV_TOKEN]}
    if env.get(ENV_USER) or env.get(ENV_PASSWORD):
        if not (env.get(ENV_USER) and env.get(ENV_PASSWORD)):
            raise InputError(None, f"set both {ENV_USER} and {ENV_PASSWORD} (HTTP basic authentication)")
        found = {**found, "username": env[ENV_USER], "password": env[ENV_PASSWORD]}
    if "token" in found and "username" in found:
        raise InputError(None, "DICOMweb credentials: a bearer token and a user name are both set; keep one")
    session = create_session()
    if "token" in found:
        session.auth = BearerAuth(found["token"])
    elif "username" in found:
        session.auth = requests.auth.HTTPBasicAuth(found["username"], found["password"])
    if env.get(ENV_CA_BUNDLE):
        try:
            add_certs_to_session(session, ca_bundle=env[ENV_CA_BUNDLE])
        except OSError as err:
            raise InputError(env[ENV_CA_BUNDLE], "CA bundle not found") from err
    return session


def connect(root: str, session: requests.Session | None = None) -> DICOMwebClient:
    """A ``dicomweb_client`` client of the server at ``root`` (credentials from the environment).

    HTTP 429 / 503 / 504 answers are retried twice with a short back-off; connection failures are not.
    """
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # one INFO line per request otherwise
    client = DICOMwebClient(check_root(root), session=session or session_from_environment(), timeout=TIMEOUT)
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return client


def _problem(err: Exception) -> str:
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status, reason = err.response.status_code, err.response.reason or ""
        hint = ""
        if status in (401, 403):
            hint = f" (check the credentials: {ENV_TOKEN}, {ENV_USER} / {ENV_PASSWORD} or {ENV_CREDENTIALS})"
        return f"HTTP {status} {reason}".rstrip() + hint
    if isinstance(err, requests.Timeout):
        return "no answer in time (server too slow or unreachable)"
    if isinstance(err, requests.ConnectionError):
        return "server not reachable (connection refused or lost)"
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@contextlib.contextmanager
def server_call(url: str, what: str) -> Iterator[None]:
    """Turn a failing request about ``url`` (``what`` it was doing) into one :class:`DicomWebError` line.

    ``url`` is one that :func:`check_root` accepted, so it holds no credentials."""
    try:
        yield
    except DicomWebError:
        raise
    except (requests.RequestException, ValueError, KeyError) as err:  # dicomweb_client: ValueError on bad answers
        raise DicomWebError(url, f"{what}: {_problem(err)}") from err

