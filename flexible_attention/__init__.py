"""flexible_attention: one attention semantics, many algorithms, for Haiku."""

# pylint: disable=g-importing-member
from flexible_attention import mechanisms as _mechanisms  # Registers all.
from flexible_attention.comparison.compare import ComparisonReport
from flexible_attention.comparison.compare import ComparisonRow
from flexible_attention.comparison.compare import compare_attentions
from flexible_attention.core.cache import KVCache
from flexible_attention.core.cache import PagedKVCache
from flexible_attention.core.cache import init_cache
from flexible_attention.core.cache import init_paged_cache
from flexible_attention.core.inputs import AttentionInputs
from flexible_attention.core.inputs import canonicalize
from flexible_attention.core.masks import Visibility
from flexible_attention.core.merge import merge_attention
from flexible_attention.core.mods import Mods
from flexible_attention.core.named_mods import T5ScoreMod
from flexible_attention.core.named_mods import alibi_score_mod
from flexible_attention.core.named_mods import alibi_slopes
from flexible_attention.core.named_mods import document_mask_mod
from flexible_attention.core.named_mods import prefix_lm_mask_mod
from flexible_attention.core.named_mods import t5_relative_position_bucket
from flexible_attention.core.reference import reference_attention
from flexible_attention.core.types import AttentionOutput
from flexible_attention.core.types import BlockSizes
from flexible_attention.kernels.flash import Launch as FlashLaunch
from flexible_attention.kernels.flash import LaunchConfig as FlashLaunchConfig
from flexible_attention.mechanisms.auto import select_mechanism
from flexible_attention.mechanisms.base import AttentionModule
from flexible_attention.mechanisms.registry import AttentionRequest
from flexible_attention.mechanisms.registry import Capabilities
from flexible_attention.mechanisms.registry import available_mechanisms
from flexible_attention.mechanisms.registry import capabilities
from flexible_attention.mechanisms.registry import create_attention
from flexible_attention.mechanisms.registry import register_mechanism
from flexible_attention.mechanisms.registry import support_table
from flexible_attention.modules.facade import FlexibleAttentionModule
from flexible_attention.modules.multi_head import MultiHeadAttention
from flexible_attention.sharding.layouts import LAYOUTS
from flexible_attention.sharding.layouts import permute_sequence
from flexible_attention.sharding.layouts import sequence_positions
from flexible_attention.sharding.layouts import unpermute_sequence
from flexible_attention.sharding.mesh import PartitionAxis
from flexible_attention.sharding.mesh import make_mesh

__version__ = "0.1.0"

__all__ = (
    "AttentionInputs",
    "AttentionModule",
    "AttentionOutput",
    "AttentionRequest",
    "BlockSizes",
    "Capabilities",
    "ComparisonReport",
    "ComparisonRow",
    "FlashLaunch",
    "FlashLaunchConfig",
    "FlexibleAttentionModule",
    "KVCache",
    "LAYOUTS",
    "Mods",
    "MultiHeadAttention",
    "PagedKVCache",
    "PartitionAxis",
    "T5ScoreMod",
    "Visibility",
    "alibi_score_mod",
    "alibi_slopes",
    "available_mechanisms",
    "canonicalize",
    "capabilities",
    "compare_attentions",
    "create_attention",
    "document_mask_mod",
    "init_cache",
    "init_paged_cache",
    "make_mesh",
    "merge_attention",
    "permute_sequence",
    "prefix_lm_mask_mod",
    "reference_attention",
    "register_mechanism",
    "select_mechanism",
    "sequence_positions",
    "support_table",
    "t5_relative_position_bucket",
    "unpermute_sequence",
)
