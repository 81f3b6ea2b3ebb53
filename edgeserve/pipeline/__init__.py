"""One request, from admission to its record. HTTP calls this and only formats what it returns.

    Pipeline.open(request)                                         pipeline/pipeline.py
      └ Admitter.admit: resolve the model, count the prompt        pipeline/admission.py
          └ Admitter.decide → routing.policy.choose(…, board)      ← WHERE A ROUTING DECISION IS MADE
            (the board: what the stepping loop runs and holds; routing.batching predicts who
            finishes when, so a newcomer is admitted only if everyone admitted stays on time)
          └ the prompt shaped for the chosen variant; the job, with
            GenerationJob.deadline_at = arrival + X-Deadline-Ms    ← the deadline, made absolute once
      └ a remote variant is started here; if it refuses, routed again
    Run.start → Variant.start (a place in its variant's batch,      pipeline/run.py
                               earliest deadline first)
    async for piece in Run / Run.text()                            (text pieces for JSON or SSE)
    Run.close / the end of Run.text → Recorder.completed           pipeline/record.py
      └ Variant.observe (EWMA cost update) → metrics → the one `completion` log line

Where the deadline stops a generation, from ``GenerationJob.deadline_at``:
`edgeserve.runtime.sequence.Sequence.before_step` ← WHERE THE DEADLINE STOPS A GENERATION: the
stepping loop (`edgeserve.runtime.stepper.Stepper._batch`) asks every sequence before each step,
and a sequence whose next step (or the rest of its prompt) would end past it leaves the batch;
`edgeserve.runtime.remote.RemoteVariant._relay` closes the upstream stream at it; a request still
waiting whose deadline can no longer fit its shortest useful answer when a place frees is
refused by `edgeserve.runtime.stepper.Stepper._join`.

The variants (local and remote) are reached only through `edgeserve.runtime.variant.Variant`.
"""

from edgeserve.pipeline.admission import Admission, Admitter
from edgeserve.pipeline.pipeline import Pipeline
from edgeserve.pipeline.record import CompletionRecord, Outcome, Recorder
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.pipeline.run import Run

__all__ = ["Admission", "Admitter", "CompletionRecord", "InferenceRequest", "Outcome", "Pipeline",
           "Recorder", "Run"]
