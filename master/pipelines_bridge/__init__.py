"""Pipelines wired into the master: the pipelines file, the service, MQTT views of their state.

`master-node serve --pipelines FILE` loads the file with `load_pipeline_file` (before anything
starts, so a bad file stops serve with the pipeline, job and field at fault) and runs it with
`serve_pipelines`, which returns the `PipelineService` (with or without a file); its
`dispatch_pipeline(pipeline_data)` runs a pipeline given as data. `master-node pipelines ...`
and `FabricClient.dispatch_pipeline` talk to it through the `pipelines` query.
"""

from master.pipelines_bridge.dispatch import (node_task_names, parse_dispatched,
                                              pipeline_data_from_file)
from master.pipelines_bridge.flat import flat_json, flat_json_bytes
from master.pipelines_bridge.pipeline_file import (BUILTIN_TASKS, PipelineFile, declared_tasks,
                                                   load_pipeline_file)
from master.pipelines_bridge.service import (OPERATIONS, QUERY, STORE_FILE, PipelineService,
                                             serve_pipelines)
from master.pipelines_bridge.views import job_view, run_view

__all__ = [
    "BUILTIN_TASKS", "PipelineFile", "load_pipeline_file", "declared_tasks",
    "parse_dispatched", "pipeline_data_from_file", "node_task_names",
    "PipelineService", "serve_pipelines", "QUERY", "OPERATIONS", "STORE_FILE",
    "flat_json", "flat_json_bytes", "run_view", "job_view",
]
