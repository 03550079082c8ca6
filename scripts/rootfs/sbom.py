"""SPDX 2.3 JSON for an image: every package with version, license and origin.

Field names and required properties from the SPDX 2.3 specification (spdx.github.io/
spdx-spec/v2.3), JSON schema ``spdx-schema.json``. Package URLs follow the purl ``apk`` type.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import TOOL_VERSION
from .plan import Image, Plan

_IDCHARS = re.compile(r"[^A-Za-z0-9.-]")
_LICENSE_TOKEN = re.compile(r"^[A-Za-z0-9.+-]+$")


def _alpine(p: Mapping[str, Any]) -> bool:
    return not p.get("supplier") or p["supplier"] == "Alpine Linux"


def _source_info(p: Mapping[str, Any]) -> str:
    origin = p.get("origin") or p["name"]
    if _alpine(p):
        return f"built from Alpine aports origin {origin}"
    where = f"the local repository {p['repo']} ({p['repository']})" if not p["download"] else f"repository {p['repo']}"
    return f"origin {origin}, from {where}" + (f", tagged @{p['tag']}" if p.get("tag") else "")


def _purl(p: Mapping[str, Any], arch: str, distro: str) -> str:
    """purl's apk type: the namespace is the vendor (alpine); another repository's packages are
    named by that repository, with its URL as repository_url (purl's qualifier for it)."""
    from urllib.parse import quote

    if _alpine(p):
        return f"pkg:apk/alpine/{p['name']}@{p['version']}?arch={arch}&distro={distro}"
    ns = quote(p["repo"].lower(), safe="")
    url = f"&repository_url={quote(p['repository'], safe=':/')}" if p["download"] else ""
    return f"pkg:apk/{ns}/{quote(p['name'], safe='')}@{quote(p['version'], safe='')}?arch={arch}{url}"


def spdx_id(kind: str, name: str) -> str:
    return f"SPDXRef-{kind}-{_IDCHARS.sub('-', name)}"


def license_expression(text: str) -> str:
    """Alpine's license field, as an SPDX expression (plain lists of ids are joined by AND)."""
    text = text.strip()
    if not text:
        return "NOASSERTION"
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    if any(t in ("AND", "OR", "WITH") for t in tokens):
        return text
    ids = [t for t in tokens if t not in ("(", ")")]
    if ids and all(_LICENSE_TOKEN.match(t) for t in ids):
        return " AND ".join(ids)
    return "NOASSERTION"


def _own_package(name: str, spdxid: str, sha256: str, purpose: str) -> dict[str, Any]:
    """An SPDX package entry for something we make ourselves (the image, the agent)."""
    return {
        "name": name,
        "SPDXID": spdxid,
        "versionInfo": sha256[:12],
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "checksums": [{"algorithm": "SHA256", "checksumValue": sha256}],
        "primaryPackagePurpose": purpose,
        "supplier": "Organization: Vulcan",
    }


def _template(
    plan: Plan, image_id: str, doc_packages: list[dict[str, Any]], relationships: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The OCI image a template was made from, and each of its layers, by digest."""
    from urllib.parse import quote

    image = plan.image
    assert image is not None
    from ..registry.client import Reference

    ref = Reference.parse(image.reference, "image.reference")
    base_id = "SPDXRef-BaseImage"
    name = ref.repository.rsplit("/", 1)[-1]
    url = quote(f"{ref.registry}/{ref.repository}", safe="/")
    purl = f"pkg:oci/{quote(name, safe='')}@{quote(image.manifest, safe='')}?repository_url={url}"
    doc_packages.append(
        {
            "name": image.reference,
            "SPDXID": base_id,
            "versionInfo": image.manifest,
            "supplier": "NOASSERTION",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": image.manifest[7:]}],
            "primaryPackagePurpose": "CONTAINER",
            "externalRefs": [
                {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl}
            ],
        }
    )
    relationships.append(
        {"spdxElementId": image_id, "relationshipType": "DESCENDANT_OF", "relatedSpdxElement": base_id}
    )
    for i, x in enumerate(image.layers):
        lid = f"SPDXRef-Layer-{i}"
        doc_packages.append(
            {
                "name": f"layer {i} of {image.reference}",
                "SPDXID": lid,
                "versionInfo": x.digest,
                "supplier": "NOASSERTION",
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "checksums": [{"algorithm": "SHA256", "checksumValue": x.digest[7:]}],
                "primaryPackagePurpose": "ARCHIVE",
            }
        )
        relationships.append({"spdxElementId": base_id, "relationshipType": "CONTAINS", "relatedSpdxElement": lid})
    return doc_packages, relationships


def _deb(p: Mapping[str, Any], pid: str) -> dict[str, Any]:
    from urllib.parse import quote

    entry: dict[str, Any] = {
        "name": p["name"],
        "SPDXID": pid,
        "versionInfo": p["version"],
        "supplier": f"Organization: {p['supplier']}" if p.get("supplier") else "NOASSERTION",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "sourceInfo": f"source package {p.get('origin') or p['name']}, from the image's dpkg database",
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": f"pkg:deb/debian/{quote(p['name'], safe='')}@{quote(p['version'], safe='')}"
                f"?arch={quote(p.get('arch', ''), safe='')}",
            }
        ],
    }
    if p.get("url"):
        entry["homepage"] = p["url"]
    return entry


def document(plan: Plan, packages: Sequence[Mapping[str, Any]], images: Sequence[Image]) -> dict[str, Any]:
    """The SBOM of the plan's first image; the same image in other formats (squashfs) is
    described too, as a VARIANT_OF the first, since it holds the very same files."""
    image_name, image_sha256 = images[0].output.image.name, images[0].sha256
    runtime, arch, guest_sha256, epoch = plan.runtime, plan.arch, plan.guest_sha, plan.epoch
    variants = [(i.output.image.name, i.sha256) for i in images[1:]]
    distro = f"alpine-{plan.pins.alpine.branch.lstrip('v')}"  # an Alpine-based template's apk rows too
    image_id = "SPDXRef-Image"
    doc_packages: list[dict[str, Any]] = [
        _own_package(image_name, image_id, image_sha256, "OPERATING-SYSTEM"),
        _own_package("vulcan-guest", "SPDXRef-Agent-vulcan-guest", guest_sha256, "APPLICATION"),
    ]
    relationships = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id},
        {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": "SPDXRef-Agent-vulcan-guest"},
    ]
    for name, sha in variants:
        vid = spdx_id("Image", name.rsplit(".", 1)[-1])
        doc_packages.append(_own_package(name, vid, sha, "OPERATING-SYSTEM"))
        relationships += [
            {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": vid},
            {"spdxElementId": vid, "relationshipType": "VARIANT_OF", "relatedSpdxElement": image_id},
        ]
    if plan.image is not None:
        doc_packages, relationships = _template(plan, image_id, doc_packages, relationships)
    for p in packages:
        kind = p.get("type", "apk")
        pid = spdx_id(f"Package-{kind}", p["name"])
        if kind == "deb":  # a template's dpkg database: what it records, no more (no license, no download)
            doc_packages.append(_deb(p, pid))
            relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
            continue
        entry: dict[str, Any] = {
            "name": p["name"],
            "SPDXID": pid,
            "versionInfo": p["version"],
            "supplier": f"Organization: {p.get('supplier') or 'Alpine Linux'}",
            "downloadLocation": p.get("download") or "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": license_expression(p.get("license", "")),
            "copyrightText": "NOASSERTION",
            "sourceInfo": _source_info(p),
            "externalRefs": [
                {
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": _purl(p, arch, distro),
                }
            ],
        }
        if p.get("checksum", "").startswith("Q1"):
            sha1 = base64.b64decode(p["checksum"][2:]).hex()
            entry["checksums"] = [{"algorithm": "SHA1", "checksumValue": sha1}]
        if p.get("url"):
            entry["homepage"] = p["url"]
        doc_packages.append(entry)
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image_name} ({runtime}, {arch})",
        "documentNamespace": f"https://vulcan.invalid/spdx/{runtime}-{arch}-{image_sha256}",
        "creationInfo": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
            "creators": [f"Tool: vulcan-images-{TOOL_VERSION}"],
        },
        "packages": doc_packages,
        "relationships": relationships,
    }
