"""A custom student that implements one lrkd protocol: ``Materializable``.

``FactorizedHeadStudent`` is a small Llama whose LM head is a product of two thin matrices,
``W_head = U @ V`` (vocab x rank times rank x hidden): fewer head parameters while training.
Because it implements :class:`lrkd.models.protocols.Materializable`, lrkd can sample from it
(paced rollouts, on-policy steps) and ``lrkd export`` writes it as a plain Llama, with the
product multiplied out. Used in docs/custom-students.md and tests/unit/test_custom_student.py.

Config::

    model:
      student:
        class_path: factorized_head.FactorizedHeadStudent
        init_args: {teacher_config_dir: path/to/teacher, hidden_size: 64, head_rank: 16}
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM


class FactorizedHeadStudent(nn.Module):
    """A Llama student with a rank-``head_rank`` LM head.

    Args:
        teacher_config_dir: the teacher's Hugging Face directory (the student keeps its
            vocabulary and family).
        hidden_size: the student's hidden size.
        num_hidden_layers: the student's layers.
        head_rank: the rank of the factorised LM head.
        seed: initialisation seed.
    """

    def __init__(
        self,
        teacher_config_dir: str,
        hidden_size: int = 64,
        num_hidden_layers: int = 1,
        head_rank: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        teacher = AutoConfig.from_pretrained(teacher_config_dir)
        self.config = LlamaConfig(
            vocab_size=teacher.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=max(1, hidden_size // 16),
            num_key_value_heads=max(1, hidden_size // 16),
            max_position_embeddings=teacher.max_position_embeddings,
            tie_word_embeddings=False,
            bos_token_id=teacher.bos_token_id,
            eos_token_id=teacher.eos_token_id,
            pad_token_id=teacher.pad_token_id,
        )
        torch.manual_seed(seed)
        self.body = LlamaForCausalLM(self.config).model  # embeddings, layers, final norm
        self.head_u = nn.Parameter(torch.randn(teacher.vocab_size, head_rank) * 0.02)
        self.head_v = nn.Parameter(torch.randn(head_rank, hidden_size) * head_rank**-0.5)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, L, V]."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return (hidden @ self.head_v.t()) @ self.head_u.t()

    # The Materializable protocol: this one method is all lrkd asks for.
    @torch.no_grad()
    def materialize(
        self, dtype: torch.dtype = torch.float32, into: LlamaForCausalLM | None = None
    ) -> LlamaForCausalLM:
        """A plain ``LlamaForCausalLM`` with ``lm_head.weight = U @ V``."""
        model = into if into is not None else LlamaForCausalLM(self.config)
        model.model.load_state_dict(self.body.state_dict())
        model.lm_head.weight.copy_(self.head_u @ self.head_v)
        device = self.head_u.device
        return (model if into is not None else model.to(device=device, dtype=dtype)).eval()
