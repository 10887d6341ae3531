"""Airflow: an hourly ona-usage sync, plus a daily reconciliation of last week.

Put this file in your DAGs folder on workers that have ona-usage installed, with ONA_API_KEY
and the destination's credentials (e.g. DESTINATION__POSTGRES__CREDENTIALS) in their
environment. `max_active_runs=1` keeps runs of the pipeline from overlapping; the CLI's own
lock refuses a second run on the same machine anyway.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG(
    dag_id="ona_usage_sync",
    schedule="17 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
) as sync_dag:
    BashOperator(task_id="sync", bash_command="ona-usage sync --destination postgres --start 2026-01-01")

with DAG(
    dag_id="ona_usage_verify",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
) as verify_dag:
    BashOperator(
        task_id="verify",
        bash_command="ona-usage verify --destination postgres --start {{ macros.ds_add(ds, -7) }} --end {{ ds }} --repair",
    )
