"""Jobs: the state model, and the YAML documents (receiver, sender, job) with their schemas.

Importing this package does no I/O; the ``load_*`` functions read one file
each, validate it completely and return frozen dataclasses.
"""

from dsamig.jobs.config import (
    EngineSpec,
    JobSpec,
    ReceiverConfig,
    SenderConfig,
    job_name_problem,
    load_job,
    load_receiver_config,
    load_sender_config,
)
from dsamig.jobs.model import TRANSITIONS, InvalidTransition, JobRecord, JobRegistry, JobState

__all__ = [
    "TRANSITIONS",
    "EngineSpec",
    "InvalidTransition",
    "JobRecord",
    "JobRegistry",
    "JobSpec",
    "JobState",
    "ReceiverConfig",
    "SenderConfig",
    "job_name_problem",
    "load_job",
    "load_receiver_config",
    "load_sender_config",
]
