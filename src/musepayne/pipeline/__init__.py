"""Whole runs: cube(s) -> catalogue + report (resumable), and many cubes on Dask.

* :mod:`~musepayne.pipeline.runner` -- :class:`Pipeline` / :class:`RunConfig`
  (extract -> prepare -> fit -> catalogue, atomic checkpoints);
* :mod:`~musepayne.pipeline.survey` -- :class:`Survey` / :class:`SurveyConfig`;
* :mod:`~musepayne.pipeline.report` -- the HTML report and its figures.

May import: every stage and :mod:`musepayne.science`; Dask only inside the survey.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "report": ["make_report"],
        "runner": ["Pipeline", "RunConfig", "load_config_file"],
        "survey": ["Survey", "SurveyConfig", "read_store_catalogue"],
    },
)
