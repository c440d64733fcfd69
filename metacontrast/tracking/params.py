"""What of a config is logged: flattened, MLflow-safe params without identifying DICOM keys, and its hash.

Nothing here reads the environment or DICOM headers: only what the workflows pass is logged, and config
keys named like identifying DICOM attributes (``PatientName``, ``StudyDate`` ...) are dropped before
logging as a last line of defence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DICOM_IDENTIFYING_KEYWORDS", "MAX_PARAM_VALUE", "config_hash", "flatten_config", "identifying"]

logger = logging.getLogger(__name__)

# MLflow limits (mlflow.utils.validation): param values 6000 chars, keys 250, 100 params a batch.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_BATCH = 100
TRUNCATION_MARK = "...[truncated]"
#: hex digits of :func:`config_hash`; ``<workflow>_run.json`` files store hashes of this length
CONFIG_HASH_DIGITS = 16
#: DICOM keywords of identifying attributes: config keys with these names are never logged.
DICOM_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID", "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
        "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "AccessionNumber",
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "StudyID",
    }
)  # fmt: skip


def config_hash(config: Any) -> str:
    """First 16 hex digits of the SHA-256 of the config as canonical JSON (sorted keys, compact, ``str`` for
    anything JSON lacks).

    The one config hash of the package: the ``config_hash`` tag of a run and the hash an output folder's
    ``<workflow>_run.json`` stores (:func:`metacontrast.workflows.checkpoints.prepare_output_dir`) to
    resume or refuse it.  Folders written before the two were one hash the same text to the same 16
    digits, so they resume; run tags written before then hold the first 12 of them.
    """
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:CONFIG_HASH_DIGITS]


def _param_key(key: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def identifying(key: str) -> bool:
    """Whether a (dotted) config or tag key names an identifying DICOM attribute."""
    return any(part in DICOM_IDENTIFYING_KEYWORDS for part in re.split(r"[.#/]", key))


def flatten_config(config: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Nested config as MLflow params: ``{"a.b.c": "value"}``.

    Lists and other leaves are JSON text; keys are made MLflow-safe and values truncated to
    MLflow's limits; keys naming identifying DICOM attributes are dropped.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and (value or not prefix):
            for k, v in value.items():
                visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
            return
        if identifying(prefix):
            logger.warning("not logging config key %r: it names an identifying DICOM attribute", prefix)
            return
        flat[_param_key(prefix)] = _param_value(value)

    visit("", dict(config))
    return flat
