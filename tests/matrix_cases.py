"""The delta methods as the generic test matrix builds them on the tiny models."""
import tiny_models as tm
from opendelta import (AdapterModel, BitFitModel, CompacterModel, LoraModel, LowRankAdapterModel,
                       ParallelAdapterModel, PrefixModel, SoftPromptModel)

#: soft tokens used on the tiny models (they have 64 positions; 100 is tried elsewhere).
PROMPT = 4

#: method -> (class, constructor arguments besides the defaults)
METHODS = {
    "lora": (LoraModel, {}),
    "bitfit": (BitFitModel, {}),
    "adapter": (AdapterModel, {}),
    "low_rank_adapter": (LowRankAdapterModel, {}),
    # hidden 32 // reduction_factor 16 = 2 is not divisible by hypercomplex_division 4
    # (test_compacter_indivisible_sizes_raise); 32 // 8 = 4 is.
    "compacter": (CompacterModel, {"reduction_factor": 8}),
    "parallel_adapter": (ParallelAdapterModel, {}),
    "prefix": (PrefixModel, {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16}),
    "soft_prompt": (SoftPromptModel, {"soft_token_num": PROMPT}),
}

#: zero-initialised updates: a fresh delta changes nothing, exactly.
EXACT_AT_INIT = {"lora", "bitfit"}

#: (method, architecture) pairs that must refuse with a clear error instead.
UNSUPPORTED = {("prefix", "deberta-v2"): (NotImplementedError, r"DebertaV2Attention \(deberta-v2\).*implemented for")}


def real_positions(logits, method, arch):
    """Logits of the caller's tokens (SoftPrompt adds leading positions on non-seq2seq LMs)."""
    if method == "soft_prompt" and arch not in tm.ENCODER_DECODER:
        return logits[:, PROMPT:]
    return logits
