"""Serving artifacts: standalone user/item towers (torch only), checksummed manifests, retrieval bundles."""

from learn.export.bundle import Bundle, BundleSummary, load_bundle, write_bundle
from learn.export.manifest import ArtifactError, verify_manifest, write_manifest
from learn.export.towers import (
    ItemTower,
    UserTower,
    export_towers,
    load_item_tower,
    load_twin_towers,
    load_user_tower,
)

__all__ = [
    "ArtifactError",
    "Bundle",
    "BundleSummary",
    "ItemTower",
    "UserTower",
    "export_towers",
    "load_bundle",
    "load_item_tower",
    "load_twin_towers",
    "load_user_tower",
    "verify_manifest",
    "write_bundle",
    "write_manifest",
]
