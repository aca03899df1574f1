"""Routing rules (``Routes`` in the configuration): what happens to each stored instance, series or study.

A rule has a name, a trigger, a filter and actions in a fixed order: anonymize, modify, forward, delete the
source after success. Rules are parsed and validated at start (every error names the rule), and matching is a
pure function of the dataset and where it came from, so it is trivial to test and cheap to run::

    "Routes": [{
        "Name": "research",
        "Trigger": "Instance",                       // or "StableSeries", "StableStudy"
        "Filter": {
            "CallingAet": ["CT*", "MR1"],            // wildcards * and ?
            "CalledAet": "DICOMNODE",
            "RemoteHost": ["10.1.0.0/16", "127.0.0.1"],
            "Tags": {
                "Modality": ["CT", "MR"],            // one of (each may hold wildcards)
                "StudyDescription": "*CHEST*",       // wildcard
                "PatientID": {"Regex": "^R[0-9]+$"},
                "StudyDate": {"Range": "20200101-20201231"},
                "0008,0080": {"Present": true},
                "ReferencedImageSequence[*].ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2"
            },
            "AnyOf": [{...}, {...}], "Not": {...}     // combinable
        },
        "Anonymize": {"DicomVersion": "2023b"},      // an Orthanc /anonymize body
        "Modify": {"Replace": {"InstitutionName": "Research"}},
        "Forward": ["dest"],                         // names in DicomModalities
        "DeleteSourceAfterSuccess": false,
        "Project": "research",                       // pseudonym map shared by rules (default: the rule's name)
        "PseudonymKeyFile": "research.key"           // optional: pseudonyms derived from this secret (HMAC)
    }]

A rule without ``Forward`` stores its result back into the archive (as Orthanc's anonymize does), shown as the
destination ``@archive``; what a rule stores there is never routed again (no loop).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.dicom import tags as tagmod
from node.dicom.errors import RequestError
from node.dicom.fileio import read_header
from node.dicom.maintags import MalformedDataset
from node.dicom.request import Modification, parse_anonymize, parse_modify
from node.dicom.tags import ANY_ITEM, DicomPath

TRIGGERS = ("Instance", "StableSeries", "StableStudy")
ROUTE_KEYS = {"Name", "Trigger", "Filter", "Anonymize", "Modify", "Forward", "DeleteSourceAfterSuccess", "Project",
              "PseudonymKeyFile"}  # fmt: skip
#: The destination of a rule that has no ``Forward``: its result is stored in our own archive.
ARCHIVE = "@archive"
FILTER_KEYS = {"CallingAet", "CalledAet", "RemoteHost", "Tags", "AnyOf", "Not"}
CONDITION_KEYS = {"Regex", "Range", "Present", "Equals", "OneOf"}


class RouteError(ValueError):
    """A rule that cannot be used; the message names the rule and the field."""


@dataclass(frozen=True)
class Origin:
    """Where an instance came from (what the filter's network conditions look at)."""

    calling_aet: str = ""
    called_aet: str = ""
    remote_host: str = ""


@dataclass(frozen=True)
class TagCondition:
    path: DicomPath
    patterns: tuple[str, ...] = ()  # equals / wildcard / one of
    regex: re.Pattern[str] | None = None
    low: str | None = None
    high: str | None = None
    present: bool | None = None

    def matches(self, ds: Dataset) -> bool:
        values = list(_values(ds, self.path))
        if self.present is not None:
            return bool(values) == self.present
        if not values:
            return False
        return any(self._match_one(v) for v in values)

    def _match_one(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.search(value) is not None
        if self.low is not None or self.high is not None:
            return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        return any(_wildcard(p, value) for p in self.patterns)


@dataclass(frozen=True)
class Filter:
    calling_aets: tuple[str, ...] = ()
    called_aets: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tags: tuple[TagCondition, ...] = ()
    any_of: tuple[Filter, ...] = ()
    negated: Filter | None = None

    @property
    def needs_dataset(self) -> bool:
        return (
            bool(self.tags)
            or any(f.needs_dataset for f in self.any_of)
            or bool(self.negated and self.negated.needs_dataset)
        )

    def matches(self, ds: Dataset | None, origin: Origin) -> bool:
        if self.calling_aets and not any(_wildcard(p, origin.calling_aet.strip()) for p in self.calling_aets):
            return False
        if self.called_aets and not any(_wildcard(p, origin.called_aet.strip()) for p in self.called_aets):
            return False
        if self.networks and not _in_networks(origin.remote_host, self.networks):
            return False
        if self.tags and (ds is None or not all(c.matches(ds) for c in self.tags)):
            return False
        if self.any_of and not any(f.matches(ds, origin) for f in self.any_of):
            return False
        return not (self.negated is not None and self.negated.matches(ds, origin))


@dataclass(frozen=True)
class Route:
    name: str
    trigger: str
    filter: Filter
    anonymize: Modification | None
    modify: Modification | None
    forward: tuple[str, ...]
    delete_source: bool
    project: str
    bodies: dict[str, Any] = field(default_factory=dict)  # the JSON bodies as written (for logs and replay)
    key_file: str | None = None  # PseudonymKeyFile as written (resolved against the config file's folder)

    def matches(self, ds: Dataset | None, origin: Origin) -> bool:
        return self.filter.matches(ds, origin)

    @property
    def destinations(self) -> tuple[str, ...]:
        return self.forward or (ARCHIVE,)

    @property
    def transforms(self) -> bool:
        return self.anonymize is not None or self.modify is not None


def _wildcard(pattern: str, value: str) -> bool:
    """DICOM-style wildcard: ``*`` and ``?`` only (no character classes), case-sensitive."""
    if "*" not in pattern and "?" not in pattern:
        return pattern == value
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _in_networks(host: str, networks: Iterable[Any]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in n for n in networks)


def _values(ds: Dataset, path: DicomPath) -> Iterator[str]:
    """The string values at ``path`` (any item for ``[*]``; each value of a multi-valued element)."""
    datasets = [ds]
    for tag, index in path.prefix:
        nxt = []
        for d in datasets:
            if tag in d and d[tag].VR == "SQ":
                items = list(d[tag].value)
                nxt.extend(items if index is ANY_ITEM else items[index : index + 1])
        datasets = nxt
    for d in datasets:
        if path.final not in d:
            continue
        value = d[path.final].value
        if value is None or value == "":
            continue
        for v in value if isinstance(value, MultiValue | list) else [value]:
            yield str(v).strip()


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RouteError(f"{where} must be a string or a non-empty list of strings, got {value!r}")


def _condition(text: str, spec: Any, where: str) -> TagCondition:
    try:
        path = tagmod.parse_path(text)
    except tagmod.TagError as exc:
        raise RouteError(f"{where}: {exc}") from None
    if isinstance(spec, str | list):
        return TagCondition(path, patterns=_strings(spec, f"{where}.{text}"))
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in CONDITION_KEYS:
        raise RouteError(f"{where}.{text}: a condition is a string, a list of strings, or one of "
                         f"{{{', '.join(sorted(CONDITION_KEYS))}: …}}, got {spec!r}")  # fmt: skip
    kind, arg = next(iter(spec.items()))
    if kind in ("Equals", "OneOf"):
        return TagCondition(path, patterns=_strings(arg, f"{where}.{text}.{kind}"))
    if kind == "Regex":
        if not isinstance(arg, str):
            raise RouteError(f"{where}.{text}.Regex must be a string")
        try:
            return TagCondition(path, regex=re.compile(arg))
        except re.error as exc:
            raise RouteError(f"{where}.{text}.Regex: invalid regular expression: {exc}") from None
    if kind == "Range":
        if not isinstance(arg, str) or arg.count("-") != 1:
            raise RouteError(f"{where}.{text}.Range must be 'low-high' (either side may be empty), got {arg!r}")
        low, high = (s.strip() or None for s in arg.split("-"))
        return TagCondition(path, low=low, high=high)
    if not isinstance(arg, bool):
        raise RouteError(f"{where}.{text}.Present must be true or false")
    return TagCondition(path, present=arg)


def parse_filter(raw: Any, where: str) -> Filter:
    if raw is None:
        return Filter()
    if not isinstance(raw, dict):
        raise RouteError(f"{where} must be an object")
    unknown = set(raw) - FILTER_KEYS
    if unknown:
        raise RouteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(expected {', '.join(sorted(FILTER_KEYS))})")  # fmt: skip
    networks = []
    for text in _strings(raw["RemoteHost"], f"{where}.RemoteHost") if "RemoteHost" in raw else ():
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise RouteError(f"{where}.RemoteHost: {text!r} is not an IP address or network") from None
    tags = raw.get("Tags", {})
    if not isinstance(tags, dict):
        raise RouteError(f"{where}.Tags must be an object of tag: condition")
    any_of = raw.get("AnyOf", [])
    if not isinstance(any_of, list):
        raise RouteError(f"{where}.AnyOf must be a list of filters")
    return Filter(
        calling_aets=_strings(raw["CallingAet"], f"{where}.CallingAet") if "CallingAet" in raw else (),
        called_aets=_strings(raw["CalledAet"], f"{where}.CalledAet") if "CalledAet" in raw else (),
        networks=tuple(networks),
        tags=tuple(_condition(k, v, f"{where}.Tags") for k, v in tags.items()),
        any_of=tuple(parse_filter(f, f"{where}.AnyOf[{i}]") for i, f in enumerate(any_of)),
        negated=parse_filter(raw["Not"], f"{where}.Not") if "Not" in raw else None,
    )


def parse_routes(raw: Any, modality_names: Iterable[str]) -> tuple[Route, ...]:
    """Validate ``Routes``; raises :class:`RouteError` naming the rule and the field."""
    if not isinstance(raw, list):
        raise RouteError("Routes must be a list of rules")
    known = sorted(modality_names)
    routes: list[Route] = []
    for i, rule in enumerate(raw):
        where = f"Routes[{i}]"
        if not isinstance(rule, dict):
            raise RouteError(f"{where} must be an object")
        name = rule.get("Name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise RouteError(f"{where}: Name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        where = f"{where} ({name})"
        if any(r.name == name for r in routes):
            raise RouteError(f"{where}: another rule has the same Name")
        unknown = set(rule) - ROUTE_KEYS
        if unknown:
            raise RouteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(expected {', '.join(sorted(ROUTE_KEYS))})")  # fmt: skip
        trigger = rule.get("Trigger", "Instance")
        if trigger not in TRIGGERS:
            raise RouteError(f"{where}: Trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
        forward = _strings(rule["Forward"], f"{where}.Forward") if "Forward" in rule else ()
        for dest in forward:
            if dest not in known:
                raise RouteError(f"{where}.Forward: {dest!r} is not in DicomModalities "
                                 f"(known: {', '.join(known) or 'none'})")  # fmt: skip
        bodies = {k: rule[k] for k in ("Anonymize", "Modify") if k in rule}
        try:
            anonymize = parse_anonymize(rule["Anonymize"]) if "Anonymize" in rule else None
            modify = parse_modify(rule["Modify"]) if "Modify" in rule else None
        except RequestError as exc:
            raise RouteError(f"{where}: {exc}") from None
        delete = rule.get("DeleteSourceAfterSuccess", False)
        if not isinstance(delete, bool):
            raise RouteError(f"{where}.DeleteSourceAfterSuccess must be true or false")
        if delete and not forward and anonymize is None and modify is None:
            raise RouteError(f"{where}: DeleteSourceAfterSuccess needs a Forward, Anonymize or Modify")
        if not forward and anonymize is None and modify is None:
            raise RouteError(f"{where}: the rule does nothing (no Anonymize, Modify or Forward)")
        project = rule.get("Project", name)
        if not isinstance(project, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", project):
            raise RouteError(f"{where}: Project must be 1-64 letters, digits, '_', '-' or '.', got {project!r}")
        key_file = rule.get("PseudonymKeyFile")
        if key_file is not None and (not isinstance(key_file, str) or not key_file.strip()):
            raise RouteError(f"{where}: PseudonymKeyFile must be the path of a file holding the secret")
        routes.append(Route(name=name, trigger=trigger, filter=parse_filter(rule.get("Filter"), f"{where}.Filter"),
                            anonymize=anonymize, modify=modify, forward=forward, delete_source=delete,
                            project=project, bodies=bodies, key_file=key_file))  # fmt: skip
    return tuple(routes)


def matching(routes: Iterable[Route], trigger: str, ds: Dataset | None, origin: Origin) -> list[Route]:
    """The rules of ``trigger`` whose filter accepts the instance (several may match; each acts)."""
    return [r for r in routes if r.trigger == trigger and r.matches(ds, origin)]


def deliveries(routes: Iterable[Route], trigger: str, ds: Dataset | None, origin: Origin) -> list[tuple[str, str]]:
    """The (rule, destination) pairs to queue for one instance."""
    return [(r.name, d) for r in matching(routes, trigger, ds, origin) for d in r.destinations]


def deliveries_for_file(
    routes: Iterable[Route], path: str, origin: Origin, trigger: str = "Instance"
) -> list[tuple[str, str]]:
    """The deliveries of ``trigger``'s rules for one file (the receiver's and the REST upload's, about to be
    stored; the stable scheduler's, stored).

    The header (no pixel data) is read only when a filter looks at tags; raises ``MalformedDataset`` when it
    cannot be read.
    """
    trigger_rules = [r for r in routes if r.trigger == trigger]
    if not trigger_rules:
        return []
    ds = None
    if any(r.filter.needs_dataset for r in trigger_rules):
        try:
            ds = read_header(path)
        except Exception as exc:
            raise MalformedDataset(f"cannot read the dataset for the routing rules: {exc}") from exc
    return deliveries(trigger_rules, trigger, ds, origin)
