#!/usr/bin/env python3
"""SimpleQuery in DuckDB (python duckdb, threads=2) on the plaintext people.csv, for
bench/compare.py.

Usage: python duckdb_simple_query.py INPUT_CSV OUTPUT_CSV SCRATCH_DIR

Same semantics as `ppml simple-query`: read people (name,age,job, header row) with an explicit
schema (age BIGINT), count(name) over all rows, print the `name, age + 1` preview (20 rows),
and COPY the rows with `job = 'Developer' AND age BETWEEN 20 AND 40` (inclusive), all three
columns, to one CSV file with a header. The last stdout line is `RESULT {json}` with
count(name), the seconds spent importing and connecting, and the query time from reading to
finished writing.
"""
import json
import os
import sys
import time

started = time.perf_counter()

import duckdb  # noqa: E402


def sql_string(s):
    return "'" + s.replace("'", "''") + "'"


def main():
    inp, out, scratch = sys.argv[1:4]
    os.makedirs(scratch, exist_ok=True)
    con = duckdb.connect(config={"threads": 2, "temp_directory": scratch})
    session_s = time.perf_counter() - started

    query_started = time.perf_counter()
    if os.path.isdir(inp):  # a directory of plaintext Parquet files (bench/formats.py)
        con.execute(
            "CREATE VIEW people AS SELECT name, CAST(age AS BIGINT) AS age, job FROM read_parquet("
            + sql_string(os.path.join(inp, "*.parquet"))
            + ")"
        )
    else:
        con.execute(
            "CREATE VIEW people AS SELECT * FROM read_csv("
            + sql_string(inp)
            + ", header = true, columns = {'name': 'VARCHAR', 'age': 'BIGINT', 'job': 'VARCHAR'})"
        )
    count = con.execute("SELECT count(name) FROM people").fetchone()[0]
    print(f"count(name): {count}")
    preview = con.execute('SELECT name, age + 1 AS "age + 1" FROM people LIMIT 20').fetchall()
    print("name\tage + 1")
    for name, age1 in preview:
        print(f"{name}\t{age1}")
    con.execute(
        "COPY (SELECT name, age, job FROM people "
        "WHERE job = 'Developer' AND age BETWEEN 20 AND 40) TO "
        + sql_string(out)
        + " (FORMAT csv, HEADER true, DELIMITER ',')"
    )
    query_s = time.perf_counter() - query_started
    con.close()

    print("RESULT " + json.dumps({"count": count, "session_s": session_s, "query_s": query_s,
                                  "version": duckdb.__version__}), flush=True)


if __name__ == "__main__":
    main()
