"""The code location: ``defs`` for the policy at $HEIMDALL_STORAGE_POLICY (default: Heimdall's)."""

from heimdall_storage_pipeline.core.policy import load_policy
from heimdall_storage_pipeline.defs.build import build_definitions

defs = build_definitions(load_policy())
