"""Jobs: records and their state table, and the YAML documents (receiver, sender,
job) with their schemas.  The states are ``dsamig.settings.JobState``.

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
from dsamig.jobs.model import TRANSITIONS, InvalidTransition, JobRecord, JobRegistry

__all__ = [
    "TRANSITIONS",
    "EngineSpec",
    "InvalidTransition",
    "JobRecord",
    "JobRegistry",
    "JobSpec",
    "ReceiverConfig",
    "SenderConfig",
    "job_name_problem",
    "load_job",
    "load_receiver_config",
    "load_sender_config",
]
