"""A plain dlt pipeline script for `dlt deploy` and other schedulers that run a Python file.

    dlt deploy pipelines/ona_usage_pipeline.py github-action --schedule "17 * * * *"

The API key comes from ONA_API_KEY (or SOURCES__ONA_USAGE__API_KEY); everything else from
`[sources.ona_usage]` in .dlt/config.toml or SOURCES__ONA_USAGE__* variables, as for the CLI.
On a runner whose disk is thrown away, point the destination at a persistent warehouse: dlt
restores the cursor from there. `ona-usage sync` does the same run with chunked commits, a
lock and a one-line summary; prefer it where a shell command will do.
"""

import dlt

from ona_usage import ona_usage

if __name__ == "__main__":
    # DuckDB by default, in a file not named like the dataset (see the README); any dlt destination works.
    destination = dlt.destinations.duckdb("ona-usage.duckdb")
    pipeline = dlt.pipeline(pipeline_name="ona_usage", destination=destination, dataset_name="ona_usage")
    load_info = pipeline.run(ona_usage())
    print(load_info)
