"""SQL over a run's Parquet files (DuckDB) and the charts that answer the method's questions
(Altair). Imports neither torch nor ray.

    from analysis import connect, queries
    con = connect("results/quickstart")
    queries.run(con, queries.ACCURACY_BY_LENGTH)
"""

from analysis import queries
from analysis.db import connect

__all__ = ["connect", "queries"]
