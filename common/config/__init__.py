"""Typed configuration: `site.yaml` (one per hospital) and `federation.yaml` (the coordinator's).

Every default lives here, once. Loading rejects unknown keys and wrong types with a message that
names the file, the field and what was expected. The modules: base (strict models, loading),
site, federation, policy, cvae (the CVAE route and its extractor).
"""

from common.config.base import ConfigError, commented_yaml, deep_merge, dump_yaml
from common.config.cvae import EXTRACTOR_DIMS, CvaeConfig, ExtractorConfig
from common.config.federation import DownstreamConfig, FederationConfig, load_federation_config
from common.config.policy import POLICY_BOUNDS, PolicyConfig
from common.config.site import (
    PROFILES,
    ClassifierConfig,
    CoordinatorAddress,
    DataConfig,
    GanConfig,
    ModelsConfig,
    PhantomConfig,
    SiteConfig,
    SplitConfig,
    SynthConfig,
    WalkConfig,
    load_site_config,
    profile_site_config,
)

__all__ = [
    "ConfigError",
    "commented_yaml",
    "deep_merge",
    "dump_yaml",
    "CvaeConfig",
    "EXTRACTOR_DIMS",
    "ExtractorConfig",
    "POLICY_BOUNDS",
    "PolicyConfig",
    "ClassifierConfig",
    "CoordinatorAddress",
    "DataConfig",
    "GanConfig",
    "ModelsConfig",
    "PROFILES",
    "PhantomConfig",
    "SiteConfig",
    "SplitConfig",
    "SynthConfig",
    "WalkConfig",
    "load_site_config",
    "profile_site_config",
    "DownstreamConfig",
    "FederationConfig",
    "load_federation_config",
]
