"""From a trained run to a deployable model: export formats, int8, manifests, prediction on image files.

The command-line tools are `python -m vitblocks.export` and `python -m vitblocks.predict`
(docs/deploy.md); this package is what they are made of.
"""

from vitblocks.deploy.errors import DeployError
from vitblocks.deploy.formats import FORMATS, export_model, load_artifact
from vitblocks.deploy.manifest import compare, find_artifact, read_manifest, write_manifest
from vitblocks.deploy.source import Source, load_source

__all__ = ["FORMATS", "DeployError", "Source", "compare", "export_model", "find_artifact", "load_artifact",
           "load_source", "read_manifest", "write_manifest"]
