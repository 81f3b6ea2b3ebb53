"""One request, from admission to its record. HTTP calls this and only formats what it returns.

    Pipeline.open(request)                                         pipeline/pipeline.py
      └ Admitter.admit: resolve the model, count the prompt        pipeline/admission.py
          └ Admitter.decide → routing.policy.choose                ← WHERE A ROUTING DECISION IS MADE
          └ the prompt shaped for the chosen variant; the job, with
            GenerationJob.deadline_at = arrival + X-Deadline-Ms    ← the deadline, made absolute once
      └ a remote variant is started here; if it refuses, routed again
    Run.start → Variant.start (a CPU slot, earliest deadline first) pipeline/run.py
    async for piece in Run / Run.text()                            (text pieces for JSON or SSE)
    Run.close / the end of Run.text → Recorder.completed           pipeline/record.py
      └ Variant.observe (EWMA cost update) → metrics → the one `completion` log line

Where the deadline stops a generation: the variant's own loop, from ``GenerationJob.deadline_at``
— `edgeserve.runtime.runner.LlamaRunner._token_loop` checks it before every decode step (it
stops when the next token would end past it) and `edgeserve.runtime.remote.RemoteVariant._relay`
closes the upstream stream at it; a request still queued whose deadline can no longer fit its
shortest useful answer is refused by `edgeserve.runtime.scheduler.Scheduler._release`.

The variants (local and remote) are reached only through `edgeserve.runtime.variant.Variant`.
"""

from edgeserve.pipeline.admission import Admission, Admitter
from edgeserve.pipeline.pipeline import Pipeline
from edgeserve.pipeline.record import CompletionRecord, Outcome, Recorder
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.pipeline.run import Run

__all__ = ["Admission", "Admitter", "CompletionRecord", "InferenceRequest", "Outcome", "Pipeline",
           "Recorder", "Run"]
