"""`LLaMAModelLoader`: the seed's model loader, on `tools.loading.load_model` (embedded default, folder, GGUF, Hub)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import ModelGeometry, attention_modules, decoder_model, model_geometry
from ..tools.loading import ModelConfig, load_model
from .interfaces import ModelLoaderInterface

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class LLaMAModelLoader(ModelLoaderInterface):
    """Loads a Llama-family causal LM and its tokenizer; anything that needs them loads them on first use.

    Args:
        config: a `ModelConfig`, a model path / Hub id (the seed's old spelling), or None for `ModelConfig.from_env()`.
        model, tokenizer: an already loaded pair to wrap instead (nothing is loaded then).
    """

    def __init__(
        self,
        config: ModelConfig | str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        if isinstance(config, str):
            config = ModelConfig(model_path=config)
        self.config = config if config is not None else ModelConfig.from_env()
        if (model is None) != (tokenizer is None):
            raise ValueError("give both model and tokenizer, or neither")
        self._model, self._tokenizer = model, tokenizer

    # --- loading ----------------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Load model and tokenizer (eval mode) unless already loaded."""
        if self._model is None:
            self._model, self._tokenizer = load_model(self.config)

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> PreTrainedModel:
        self.load_model()
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        self.load_model()
        return self._tokenizer

    @property
    def name(self) -> str:
        """The model's path or Hub id, or the default model's name."""
        return self.config.model_path or DEFAULT_MODEL_NAME

    # --- shape facts (the seed's loader attributes) -------------------------------------------------------------------
    @property
    def geometry(self) -> ModelGeometry:
        return model_geometry(self.model)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.geometry.num_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.geometry.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.geometry.head_dim

    @property
    def hidden_size(self) -> int:
        return self.geometry.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.get_text_config(decoder=True).vocab_size

    # --- weights ----------------------------------------------------------------------------------------------------
    def layer_index(self, layer_idx: int) -> int:
        """`layer_idx` checked and made non-negative (-1 is the last layer, as in the seed)."""
        count = self.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not -count <= layer_idx < count:
            raise IndexError(f"layer_idx {layer_idx!r} out of range for a model with {count} layers")
        return layer_idx % count

    def attention_module(self, layer_idx: int) -> nn.Module:
        return attention_modules(self.model)[self.layer_index(layer_idx)]

    def get_model_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """Every parameter of decoder layer `layer_idx` by name, detached copies (offloaded weights are read in)."""
        layer = decoder_model(self.model).layers[self.layer_index(layer_idx)]
        with onloaded_layer(layer):
            return {name: param.detach().clone() for name, param in layer.named_parameters()}

    def get_attention_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """``{"q_proj": W_q, "k_proj": W_k, "v_proj": W_v, "o_proj": W_o}`` of one layer (W is [out, in])."""
        weights = self.get_model_weights(layer_idx)
        return {name: weights[f"self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def get_language_model_head(self) -> torch.Tensor:
        """The LM head weight [vocab, hidden] (the seed's legacy accessor)."""
        head = self.model.get_output_embeddings()
        with onloaded_layer(head):
            return head.weight.detach().clone()


def onloaded_layer(module: nn.Module) -> ExitStack:
    """Context in which `module`'s weights are real tensors (on CPU where accelerate had offloaded them)."""
    stack = ExitStack()
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # accelerate < 1.1
        return stack
    for sub in module.modules():
        if has_offloaded_params(sub):
            stack.enter_context(align_module_device(sub, torch.device("cpu")))
    return stack
