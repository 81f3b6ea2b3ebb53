"""A speculative pair as a runner: a lane of the stepping loop over two variants already loaded.

The pair loads no weights: when its target and its draft are loaded it composes their decoders
(runtime.speculative.SpeculativeDecoder) into a lane of its own, with the target's `parallel`
places; its prompts are the target's (chat template, tokenizer). Both variants' contexts hold
the pair's sequences beside their own (`extra_sequences`, set here before they load).
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from edgeserve.errors import ModelPreparationError
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.speculative import SpeculativeDecoder


class PairRunner(LlamaRunner):
    """`target` verifies what `draft` proposes (up to the target's `draft_max` tokens a step)."""

    def __init__(self, variant_id: str, target: LlamaRunner, draft: LlamaRunner) -> None:
        name = variant_id.rpartition(":")[2]
        super().__init__(variant_id, target.path, msgspec.structs.replace(target.config, name=name),
                         target.stepper)
        self.target = target
        self.draft = draft
        self._target_first = target.parallel + target.extra_sequences
        self._draft_first = draft.parallel + draft.extra_sequences
        target.extra_sequences += self.parallel
        draft.extra_sequences += self.parallel

    @property
    def draft_max(self) -> int:
        return self.config.draft_max

    @property
    def files(self) -> list[Path]:
        return [self.target.path, self.draft.path]

    @property
    def file_bytes(self) -> int:
        return self.target.file_bytes + self.draft.file_bytes

    def _load(self) -> None:
        if self._decoder is not None:
            return
        target, draft = self.target.decoder, self.draft.decoder
        if target is None or draft is None:
            raise ModelPreparationError(f"{self.variant_id}: load {self.target.variant_id} and "
                                        f"{self.draft.variant_id} before their speculative pair")
        started = time.perf_counter()
        decoder = SpeculativeDecoder(target, draft, parallel=self.parallel, target_first=self._target_first,
                                     draft_first=self._draft_first, draft_max=self.draft_max,
                                     adaptive=self.config.draft_adaptive)
        with self._swap_lock:
            self._decoder = decoder
            self.stepper.attach(self.variant_id, decoder, self.parallel, lambda: self.profile)
            self.load_ms = (time.perf_counter() - started) * 1000
            self.loaded = True

    def _unload(self) -> None:
        with self._swap_lock:
            if self._decoder is None:
                return
            self.stepper.detach(self.variant_id)
            self._decoder = None
            self.loaded = False

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.target.render_chat(messages)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        return self.target.tokenize(text, chat=chat)
