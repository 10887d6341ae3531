"""A plain dlt pipeline script for `dlt deploy` and other schedulers that run a Python file.

    dlt deploy pipelines/ona_usage_pipeline.py github-action --schedule "17 * * * *"

The API key comes from ONA_API_KEY (or SOURCES__ONA_USAGE__API_KEY); everything else from
`[sources.ona_usage]` in .dlt/config.toml or SOURCES__ONA_USAGE__* variables, as for the CLI.
On a runner whose disk is thrown away, point the destination at a persistent warehouse: dlt
restores the cursor from there. `ona-usage sync` runs the same source with chunked commits, a
lock and a one-line summary; prefer it where a shell command will do.
"""

import dlt

from ona_usage import ona_usage, ona_usage_models

if __name__ == "__main__":
    # dlt's defaults: DuckDB in ona_usage.duckdb; any dlt destination works.
    pipeline = dlt.pipeline(pipeline_name="ona_usage", destination="duckdb", dataset_name="ona")
    print(pipeline.run(ona_usage()))
    print(pipeline.run(ona_usage_models(pipeline)))
