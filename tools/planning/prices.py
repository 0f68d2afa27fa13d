"""$/h of an instance, on-demand and spot, from SkyPilot's catalog or a CSV in its columns.

``load_prices(None)`` reads SkyPilot's catalog when it is cached on this machine
(``~/.sky/catalogs/v*/<cloud>/vms.csv``; SkyPilot fetches it on first use, so it is absent
offline) and otherwise the sample shipped next to this file (``prices-sample.csv``: a few
rows per accelerator the recipes use, labelled with its date in its first line).
``load_prices(path)`` reads any CSV with the catalog's own columns::

    InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone

Lines starting with ``#`` are comments. The cloud of a row is its ``Cloud`` column when the
CSV has one, else the catalog directory's name (``aws/vms.csv``), else guessed from the
region's spelling (``us-east-1`` aws, ``us-central1`` gcp, ``eastus`` azure).

``PriceTable.hourly`` is the cheapest matching row's price for the whole instance. A row
with no InstanceType (GCP GPUs attached to a host VM priced apart) prices the GPUs alone, so
it is used only when no full instance matches. Stable API: tools/report.py imports it.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

SAMPLE_CSV = Path(__file__).with_name("prices-sample.csv")
CATALOG_ROOT = Path.home() / ".sky" / "catalogs"
CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod", "oci", "nebius", "paperspace", "fluidstack")
COLUMNS = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price", "SpotPrice", "Region")


class PriceError(ValueError):
    """A price file that cannot be read: one line for the user."""


@dataclass(frozen=True)
class PriceRow:
    cloud: str | None
    instance_type: str  # "" for a GPU priced without its host VM
    accelerator: str  # "" for a CPU-only instance
    count: float
    vcpus: float | None
    memory_gib: float | None
    price: float | None  # on-demand $/h
    spot_price: float | None  # spot $/h
    region: str
    zone: str


@dataclass(frozen=True)
class PriceTable:
    rows: tuple[PriceRow, ...]
    source: str  # a human label: where the prices come from

    def hourly(self, accelerator: str, count: int, *, spot: bool, cloud: str | None = None,
               region: str | None = None) -> float | None:
        """Cheapest $/h of an instance with `count` x `accelerator`, or None if unknown."""
        matches = [r for r in self._matching(accelerator, count, cloud, region)
                   if _price(r, spot) is not None]
        whole = [r for r in matches if r.instance_type] or matches
        return min((_price(r, spot) for r in whole), default=None)

    def cheapest_row(self, accelerator: str, count: int, *, spot: bool,
                     cloud: str | None = None, region: str | None = None) -> PriceRow | None:
        """The row `hourly` takes its price from (for naming the instance type)."""
        matches = [r for r in self._matching(accelerator, count, cloud, region)
                   if _price(r, spot) is not None]
        whole = [r for r in matches if r.instance_type] or matches
        return min(whole, key=lambda r: _price(r, spot), default=None)

    def hourly_cpu(self, vcpus: float, memory_gib: float = 0.0, *, spot: bool,
                   cloud: str | None = None, region: str | None = None) -> float | None:
        """Cheapest $/h of a CPU-only instance with at least `vcpus` and `memory_gib`."""
        prices = [_price(r, spot) for r in self.rows
                  if not r.accelerator and r.vcpus is not None and r.vcpus >= vcpus
                  and (r.memory_gib or 0.0) >= memory_gib and _where(r, cloud, region)]
        return min((p for p in prices if p is not None), default=None)

    def accelerators(self) -> set[str]:
        return {r.accelerator for r in self.rows if r.accelerator}

    def _matching(self, accelerator, count, cloud, region):
        name = accelerator.lower()
        return [r for r in self.rows if r.accelerator.lower() == name
                and math.isclose(r.count, count) and _where(r, cloud, region)]


def _price(row: PriceRow, spot: bool) -> float | None:
    return row.spot_price if spot else row.price


def _where(row: PriceRow, cloud: str | None, region: str | None) -> bool:
    if cloud is not None and (row.cloud or "").lower() != cloud.lower():
        return False
    return region is None or row.region == region


def load_prices(csv_path: Path | None = None) -> PriceTable:
    """Prices from `csv_path`; None: SkyPilot's cached catalog, else the shipped sample."""
    if csv_path is not None:
        csv_path = Path(csv_path)
        return PriceTable(tuple(_read_csv(csv_path)), _label(csv_path))
    catalogs = cached_catalogs()
    if catalogs:
        rows = [row for path in catalogs for row in _read_csv(path)]
        return PriceTable(tuple(rows), f"SkyPilot catalog {catalogs[0].parent.parent}")
    return PriceTable(tuple(_read_csv(SAMPLE_CSV)), _label(SAMPLE_CSV))


def cached_catalogs(root: Path | None = None) -> list[Path]:
    """vms.csv of each cloud in the newest catalog version cached under `root`
    (default ``~/.sky/catalogs``)."""
    root = CATALOG_ROOT if root is None else root
    versions = sorted((p for p in root.glob("v*") if p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))
    if not versions:
        return []
    return sorted(p for p in versions[-1].glob("*/vms.csv") if p.parent.name in CLOUDS)


def _label(path: Path) -> str:
    """The path, and the sample's own "sample prices as of <date>" from its first line."""
    try:
        first = path.open(encoding="utf-8").readline()
    except OSError:
        return str(path)
    found = re.search(r"sample prices as of [0-9-]+", first)
    return f"{path} ({found.group(0)})" if found else str(path)


def _read_csv(path: Path) -> list[PriceRow]:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise PriceError(f"{path}: cannot read prices ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise PriceError(f"{path}: not a text CSV") from None
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PriceError(f"{path}: not a SkyPilot catalog CSV (no column {', '.join(missing)})")
    dir_cloud = path.parent.name if path.parent.name in CLOUDS else None
    rows = []
    for n, rec in enumerate(reader, start=2):
        try:
            rows.append(PriceRow(
                cloud=(rec.get("Cloud") or dir_cloud or _cloud_of_region(rec["Region"] or "")),
                instance_type=rec["InstanceType"] or "",
                accelerator=rec["AcceleratorName"] or "",
                count=_number(rec["AcceleratorCount"]) or 0.0,
                vcpus=_number(rec.get("vCPUs")),
                memory_gib=_number(rec.get("MemoryGiB")),
                price=_number(rec["Price"]),
                spot_price=_number(rec["SpotPrice"]),
                region=rec["Region"] or "",
                zone=rec.get("AvailabilityZone") or "",
            ))
        except ValueError as e:
            raise PriceError(f"{path}: row {n}: {e}") from None
    return rows


def _number(text: str | None) -> float | None:
    if text is None or not text.strip() or text.strip().lower() == "nan":
        return None
    value = float(text)
    if value < 0 or math.isnan(value):
        raise ValueError(f"negative or NaN number {text!r}")
    return value


def _cloud_of_region(region: str) -> str | None:
    if re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", region):
        return "aws"
    if re.fullmatch(r"[a-z]+-[a-z]+\d+", region):
        return "gcp"
    if re.fullmatch(r"[a-z]+[a-z0-9]*", region):
        return "azure"
    return None
