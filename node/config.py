"""Configuration: Orthanc-style JSON (comments allowed), validated at start, overridable by flags and env vars.

An Orthanc user recognises the keys: where a concept is the same we use Orthanc's name, so an existing
``orthanc.json`` starts the node (keys Orthanc knows that we do not implement yet are accepted with a warning).
A key nobody knows is a typo and stops the node with a message naming the key and the file, because a
silently ignored ``"OverwriteInstance": true`` is how archives end up behaving unlike what the admin wrote.

Relative paths are resolved against the folder of the configuration file, as Orthanc does; without a file
(the embedded default) against the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Our keys with their defaults. ``conf/node.json`` holds exactly these values (a test keeps them in step).
DEFAULTS: dict[str, Any] = {
    "Name": "dicom-node",
    "DicomAet": "DICOMNODE",
    "DicomPort": 4242,
    "DicomListenAddress": "0.0.0.0",
    "HttpPort": 8042,
    "HttpServerEnabled": True,
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": None,
    "RegisteredUsers": {},
    "StorageDirectory": "dicom-node-data/storage",
    "IndexDirectory": "dicom-node-data",
    "Database": "",
    "NodeId": "",
    "OverwriteInstances": False,
    "DicomModalities": {},
    "DicomCheckCalledAet": False,
    "DicomAlwaysAllowEcho": True,
    "DicomAlwaysAllowStore": True,
    "DicomAlwaysAllowFind": False,
    "DicomAlwaysAllowMove": False,
    "DicomAlwaysAllowGet": False,
    "DicomCheckModalityHost": False,
    "StrictAetComparison": False,
    "UnknownSopClassAccepted": True,
    "StableAge": 60,
    "DicomThreadsCount": 32,
    "DicomReceiverProcesses": 0,
    "DicomScpTimeout": 30,
    "MaximumPduLength": 4194304,
    "SyncStorageArea": True,
    "Routes": [],
    "RoutingWorkers": 0,
    "RoutingMaxAttempts": 10,
    "RoutingRetryDelay": 2,
    "RoutingRetryMaxDelay": 300,
    "RoutingLeaseTimeout": 120,
    "RoutingAssociationsPerDestination": 2,
    "RoutingBatchSize": 32,
    "ConcurrentJobs": 2,
    "JobsProcesses": 0,
    "CaseSensitivePN": False,
    "LimitFindResults": 0,
    "LimitFindInstances": 0,
}

#: Keys of Orthanc 1.10's configuration (and its common plugin sections) that we accept but do not implement
#: yet: the node starts and says which ones it ignores.
ORTHANC_KNOWN = frozenset(
    """
    AcceptedTransferSyntaxes TemporaryDirectory StorageCompression MaximumStorageSize MaximumPatientCount
    MaximumStorageMode
    MaximumStorageCacheSize LuaScripts LuaHeartBeatPeriod Plugins ConcurrentJobs JobsEngineThreadsCount
    HttpServerEnabled HttpDescribeErrors HttpCompressionEnabled WebDavEnabled WebDavDeleteAllowed
    WebDavUploadAllowed DicomServerEnabled DefaultEncoding DeflatedTransferSyntaxAccepted
    JpegTransferSyntaxAccepted Jpeg2000TransferSyntaxAccepted JpegLosslessTransferSyntaxAccepted
    JpipTransferSyntaxAccepted Mpeg2TransferSyntaxAccepted RleTransferSyntaxAccepted Mpeg4TransferSyntaxAccepted
    H265TransferSyntaxAccepted RemoteAccessAllowed SslEnabled SslCertificate SslMinimumProtocolVersion
    SslVerifyPeers SslTrustedClientCertificates AuthenticationEnabled RegisteredUsers DicomTlsEnabled
    DicomTlsCertificate DicomTlsPrivateKey DicomTlsTrustedCertificates DicomTlsRemoteCertificateRequired
    DicomTlsMinimumProtocolVersion DicomTlsCiphersAccepted DicomAlwaysAllowFind DicomAlwaysAllowFindWorklist
    DicomAlwaysAllowGet DicomAlwaysAllowMove DicomModalitiesInDatabase DicomEchoChecksFind DicomScuTimeout
    DicomScuPreferredTransferSyntax OrthancPeers OrthancPeersInDatabase HttpProxy HttpVerbose HttpTimeout
    HttpsVerifyPeers HttpsCACertificates UserMetadata UserContentType StoreMD5ForAttachments LimitFindResults
    LimitFindInstances LogExportedResources KeepAlive KeepAliveTimeout TcpNoDelay HttpThreadsCount StoreDicom
    DicomAssociationCloseDelay QueryRetrieveSize CaseSensitivePN LoadPrivateDictionary Dictionary
    SynchronousCMove JobsHistorySize SaveJobs MediaArchiveSize StorageAccessOnFind MetricsEnabled
    ExecuteLuaEnabled RestApiWriteToFileSystemEnabled HttpRequestTimeout DefaultPrivateCreator
    StorageCommitmentReportsSize TranscodeDicomProtocol BuiltinDecoderTranscoderOrder IngestTranscoding
    IngestTranscodingOfUncompressed IngestTranscodingOfCompressed DicomLossyTranscodingQuality MallocArenaMax
    DeidentifyLogs DeidentifyLogsDicomVersion CheckRevisions SynchronousZipStream ZipLoaderThreads Warnings
    OverwriteInstances ExtraMainDicomTags MaximumPduLength StorageDirectory IndexDirectory DicomWeb PostgreSQL
    MySQL Odbc Worklists Gdcm Transfers OrthancExplorer2 Authorization Python ServeFolders WebViewer
    StoneWebViewer OrthancWebViewer Housekeeper DelayedDeletion Indexer AdvancedStorage S3 AzureBlobStorage
    GoogleCloudStorage Wsi Tcia Ohif VolView
    """.split()
) - frozenset(DEFAULTS)

_ENV_PREFIX = "DICOM_NODE_"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the file."""


@dataclass(frozen=True, slots=True)
class Modality:
    """A remote DICOM node declared in ``DicomModalities``."""

    name: str
    aet: str
    host: str
    port: int
    allow_echo: bool = True
    allow_store: bool = True
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True


@dataclass(frozen=True)
class Config:
    """The validated configuration (``values`` holds every key, defaults included)."""

    values: dict[str, Any]
    source: str = "<defaults>"
    base_dir: Path = field(default_factory=Path.cwd)
    warnings: tuple[str, ...] = ()
    modalities: tuple[Modality, ...] = ()
    routes: tuple[Any, ...] = ()  # node.routing.rules.Route

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def path(self, key: str) -> Path:
        """A path-valued key, resolved against the config file's folder (Orthanc's rule)."""
        return (self.base_dir / os.path.expanduser(self.values[key])).resolve()

    @property
    def storage_dir(self) -> Path:
        return self.path("StorageDirectory")

    @property
    def database_url(self) -> str:
        """``Database`` if set, else the SQLite file ``index.db`` under ``IndexDirectory``."""
        if self.values["Database"]:
            return str(self.values["Database"])
        return "sqlite:///" + str(self.path("IndexDirectory") / "index.db")

    @property
    def shared(self) -> bool:
        """Several nodes may share this index and storage: the index is PostgreSQL (an SQLite file is one node's)."""
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def node_id(self) -> str:
        """This node among those sharing an index: ``NodeId``, else ``<Name>@<host name>``. It names the node's
        outbox claims and, on a shared storage, its spool folders and lock (see :meth:`spool_slot`)."""
        return str(self.values["NodeId"]) or f"{self.values['Name']}@{socket.gethostname()}"

    @property
    def spool_prefix(self) -> str:
        """What starts the names of this node's spool folders on a shared storage ("" for one node alone)."""
        if not self.shared:
            return ""
        # Escaped, not replaced, so that two node IDs never share a prefix ("X@pacs.lan" and "X@pacs_lan"); no
        # dot inside the node's part: the dot ends it, so that no prefix starts another ("n1." and "n10.").
        keep = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@-_")
        safe = "".join(chr(b) if b in keep else f"%{b:02X}" for b in self.node_id.encode("utf-8"))
        if len(safe) > 80:  # a folder name stays short; the digest keeps long IDs apart
            safe = safe[:60] + "%" + hashlib.sha256(self.node_id.encode("utf-8")).hexdigest()[:16]
        return safe + "."

    def spool_slot(self, slot: str) -> str:
        """The spool folder (``.tmp/<name>``) of one process of this node: its slot, prefixed on a shared storage
        so that a node recovering after a crash never touches the spool files of another node."""
        return self.spool_prefix + slot


def strip_json_comments(text: str) -> str:
    """Remove ``//`` and ``/* */`` comments outside strings (Orthanc's files carry many)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            out.append("\n" * text.count("\n", i, j))  # keep line numbers for json's error messages
            i = j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON configuration file with comments; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration file: {exc.strerror or exc}") from exc
    try:
        data = json.loads(strip_json_comments(text))
    except ValueError as exc:
        raise ConfigError(f"{p}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the configuration must be a JSON object")
    return data


def env_key(key: str) -> str:
    """``DicomPort`` -> ``DICOM_NODE_DICOM_PORT`` (how containers override a key)."""
    return _ENV_PREFIX + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).upper()


def flag_name(key: str) -> str:
    """``DicomPort`` -> ``--dicom-port`` (how the command line overrides a key)."""
    return "--" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", key).lower()


def parse_override(key: str, raw: str) -> Any:
    """A flag or env value: JSON when it parses (numbers, booleans, objects), else the plain string."""
    if isinstance(DEFAULTS.get(key), str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


#: Keys whose default is "decided from other keys" (null) and that otherwise take this type.
_NULLABLE: dict[str, type] = {"AuthenticationEnabled": bool}


def _check_type(key: str, value: Any, where: str) -> None:
    default = DEFAULTS[key]
    expected: type | tuple[type, ...] = type(default)
    if key in _NULLABLE:
        if value is None or isinstance(value, _NULLABLE[key]):
            return
        raise ConfigError(f"{where}: key {key!r} must be true, false or null, got {json.dumps(value)}")
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{where}: key {key!r} must be {type(default).__name__} (like {json.dumps(default)}), "
            f"got {json.dumps(value)}"
        )


def _parse_modalities(raw: dict[str, Any], where: str) -> tuple[Modality, ...]:
    mods = []
    for name, spec in raw.items():
        ctx = f"{where}: DicomModalities[{name!r}]"
        if not 0 < len(name) <= 64:
            raise ConfigError(f"{ctx}: the name must be 1 to 64 characters (it names a routing destination)")
        if isinstance(spec, list):
            if len(spec) < 3 or not all(isinstance(x, (str, int)) for x in spec[:3]):
                raise ConfigError(f"{ctx} must be [AET, host, port] or an object")
            aet, host, port = spec[0], spec[1], spec[2]
            opts: dict[str, Any] = {}
        elif isinstance(spec, dict):
            missing = [k for k in ("AET", "Host", "Port") if k not in spec]
            if missing:
                raise ConfigError(f"{ctx} lacks {', '.join(missing)}")
            aet, host, port = spec["AET"], spec["Host"], spec["Port"]
            opts = spec
        else:
            raise ConfigError(f"{ctx} must be [AET, host, port] or an object")
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise ConfigError(f"{ctx}: port {port!r} is not a number") from None
        if not isinstance(aet, str) or not 0 < len(aet.strip()) <= 16:
            raise ConfigError(f"{ctx}: AET {aet!r} must be 1 to 16 characters")
        if not 0 < port < 65536:
            raise ConfigError(f"{ctx}: port {port} out of range")
        flags = {}
        for key, attr in (
            ("AllowEcho", "allow_echo"), ("AllowStore", "allow_store"), ("AllowFind", "allow_find"),
            ("AllowMove", "allow_move"), ("AllowGet", "allow_get"),
        ):  # fmt: skip
            if key in opts:
                if not isinstance(opts[key], bool):
                    raise ConfigError(f"{ctx}: {key} must be true or false")
                flags[attr] = opts[key]
        mods.append(Modality(name=name, aet=aet.strip(), host=str(host), port=port, **flags))
    return tuple(mods)


def build(
    file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Defaults <- file <- environment (``DICOM_NODE_*``) <- command-line overrides, then validate."""
    values = copy.deepcopy(DEFAULTS)
    warnings: list[str] = []
    source = "<defaults>"
    base_dir = Path.cwd()
    if file is not None:
        source = str(file)
        base_dir = Path(file).resolve().parent
        for key, value in load_file(file).items():
            if key in DEFAULTS:
                _check_type(key, value, source)
                values[key] = value
            elif key == "PostgreSQL" and isinstance(value, dict) and value.get("EnableIndex"):
                url = _orthanc_postgresql_url(value, source)
                if not load_file(file).get("Database"):  # our own key, when both are given, wins
                    values["Database"] = url
                if value.get("EnableStorage"):
                    warnings.append(f"{source}: PostgreSQL.EnableStorage (files in the database) is not supported; "
                                    f"files go to StorageDirectory")  # fmt: skip
            elif key in ORTHANC_KNOWN:
                warnings.append(f"{source}: key {key!r} is an Orthanc option dicom-node does not support yet; ignored")
            else:
                close = difflib.get_close_matches(key, [*DEFAULTS, *ORTHANC_KNOWN], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    environ = os.environ if environ is None else environ
    for key in DEFAULTS:
        name = env_key(key)
        if name in environ:
            value = parse_override(key, environ[name])
            _check_type(key, value, f"environment variable {name}")
            values[key] = value
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"command line: unknown key {key!r}")
        _check_type(key, value, f"command line ({flag_name(key)})")
        values[key] = value
    return _validate(values, source, base_dir, warnings)


def _orthanc_postgresql_url(section: dict[str, Any], source: str) -> str:
    """The ``Database`` URL of an Orthanc PostgreSQL plugin section (``"PostgreSQL": {"EnableIndex": true,
    "Host", "Port", "Database", "Username", "Password"}`` or its ``ConnectionUri``): an Orthanc configuration
    that keeps its index in PostgreSQL starts dicom-node on the same kind of index."""
    from urllib.parse import quote

    uri = section.get("ConnectionUri")
    if uri:
        if not isinstance(uri, str) or not uri.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{source}: PostgreSQL.ConnectionUri must be a postgresql:// URL, got {uri!r}")
        return uri
    user, password = str(section.get("Username", "")), str(section.get("Password", ""))
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@" if user else ""
    host, port = str(section.get("Host", "localhost")), int(section.get("Port", 5432))
    return f"postgresql://{auth}{host}:{port}/{quote(str(section.get('Database', 'orthanc')), safe='')}"


def _validate(values: dict[str, Any], source: str, base_dir: Path, warnings: list[str]) -> Config:
    aet = values["DicomAet"]
    if not 0 < len(aet.strip()) <= 16 or "\\" in aet:
        raise ConfigError(f"{source}: key 'DicomAet' must be 1 to 16 characters without backslash, got {aet!r}")
    for key in ("DicomPort", "HttpPort"):
        if not 0 <= values[key] < 65536:
            raise ConfigError(f"{source}: key {key!r} must be a TCP port (0-65535), got {values[key]}")
    for key in ("DicomThreadsCount", "DicomScpTimeout"):
        if values[key] < 1:
            raise ConfigError(f"{source}: key {key!r} must be at least 1, got {values[key]}")
    if values["DicomReceiverProcesses"] < 0:
        raise ConfigError(f"{source}: key 'DicomReceiverProcesses' must be 0 (automatic) or more")
    if values["MaximumPduLength"] != 0 and not 4096 <= values["MaximumPduLength"] <= 2**31:
        raise ConfigError(f"{source}: key 'MaximumPduLength' must be 0 (unlimited) or 4096..2^31")
    if values["StableAge"] <= 0:
        values["StableAge"] = 60  # Orthanc: <= 0 means 60
    url = values["Database"]
    if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(f"{source}: key 'Database' must be a sqlite:///… or postgresql://… URL, got {url!r}")
    users = values["RegisteredUsers"]
    if not all(isinstance(u, str) and u and isinstance(p, str) for u, p in users.items()):
        raise ConfigError(f"{source}: key 'RegisteredUsers' must map user names to passwords (strings)")
    if values["AuthenticationEnabled"] is None:  # Orthanc: on as soon as the API is reachable from elsewhere
        values["AuthenticationEnabled"] = values["RemoteAccessAllowed"]
    elif values["RemoteAccessAllowed"] and not values["AuthenticationEnabled"]:
        warnings.append(f"{source}: the REST API accepts remote clients without authentication")
    if values["HttpServerEnabled"] and values["AuthenticationEnabled"] and not users:
        raise ConfigError(f"{source}: key 'RegisteredUsers' is empty while the REST API requires authentication "
                          f"(RemoteAccessAllowed or AuthenticationEnabled): nobody could log in")  # fmt: skip
    modalities = _parse_modalities(values["DicomModalities"], source)
    if any(m.name.startswith("@") for m in modalities):
        raise ConfigError(f"{source}: DicomModalities: names starting with '@' are reserved (@archive)")
    from node.routing.rules import RouteError, parse_routes

    try:
        routes = parse_routes(values["Routes"], [m.name for m in modalities])
    except RouteError as exc:
        raise ConfigError(f"{source}: key 'Routes': {exc}") from None
    routes = tuple(_resolve_key_file(r, base_dir, source) for r in routes)
    for key in ("RoutingMaxAttempts", "RoutingLeaseTimeout", "RoutingAssociationsPerDestination", "ConcurrentJobs"):
        if values[key] < 1:
            raise ConfigError(f"{source}: key {key!r} must be at least 1, got {values[key]}")
    if not 1 <= values["RoutingBatchSize"] <= 40:
        raise ConfigError(f"{source}: key 'RoutingBatchSize' must be 1..40 (an association carries at most 128 "
                          f"presentation contexts, 3 per instance), got {values['RoutingBatchSize']}")  # fmt: skip
    for key in ("RoutingWorkers", "JobsProcesses", "LimitFindResults", "LimitFindInstances"):
        if values[key] < 0:
            raise ConfigError(f"{source}: key {key!r} must be 0 or more (0: one per core, or no limit)")
    if not 0 < values["RoutingRetryDelay"] <= values["RoutingRetryMaxDelay"]:
        raise ConfigError(f"{source}: keys 'RoutingRetryDelay' and 'RoutingRetryMaxDelay' must satisfy "
                          f"0 < RoutingRetryDelay <= RoutingRetryMaxDelay")  # fmt: skip
    cfg = Config(values=values, source=source, base_dir=base_dir, warnings=tuple(warnings), modalities=modalities,
                 routes=routes)  # fmt: skip
    for key in ("StorageDirectory", "IndexDirectory"):
        _check_dir(cfg.path(key), key, source)
    return cfg


def _resolve_key_file(route: Any, base_dir: Path, source: str) -> Any:
    """A rule's ``PseudonymKeyFile``: resolved like every path, and checked now (a missing secret found on the
    first instance would hold the whole queue)."""
    if route.key_file is None:
        return route
    path = (base_dir / os.path.expanduser(route.key_file)).resolve()
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: key 'Routes': rule {route.name!r}: PseudonymKeyFile {path}: "
                          f"{exc.strerror or exc}") from None  # fmt: skip
    if len(key.strip()) < 16:
        raise ConfigError(f"{source}: key 'Routes': rule {route.name!r}: PseudonymKeyFile {path} holds fewer "
                          f"than 16 bytes: not a secret")  # fmt: skip
    return dataclasses.replace(route, key_file=str(path))


def _check_dir(path: Path, key: str, source: str) -> None:
    """The folder must exist or be creatable, and be writable: fail at start, not on the first C-STORE."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{source}: key {key!r}: cannot create {path}: {exc.strerror or exc}") from exc
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: key {key!r}: {path} is not a writable folder")
