#!/usr/bin/env python3
"""SimpleQuery in Apache Spark (pyspark, local[2]) on the plaintext people.csv, for bench/compare.py.

Usage: python spark_simple_query.py INPUT_CSV OUTPUT_DIR SCRATCH_DIR

Same semantics as `ppml simple-query` (and BigDL PPML's SimpleQuerySparkExample): read people
(name,age,job, header row) with an explicit schema (age as a 64-bit integer, as ppml reads it),
count(name) over all rows, show the `name, age + 1` preview (20 rows), keep
`job = 'Developer' AND age BETWEEN 20 AND 40` (inclusive) and write all three columns as CSV
with a header. The last stdout line is `RESULT {json}` with count(name), the seconds spent
starting the session, and the query time from reading to finished writing.
"""
import json
import os
import sys
import time

started = time.perf_counter()

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import LongType, StringType, StructField, StructType  # noqa: E402


def main():
    inp, out, scratch = sys.argv[1:4]
    os.makedirs(scratch, exist_ok=True)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("SimpleQuery")
        .config("spark.driver.memory", "2g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.local.dir", scratch)
        .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={scratch}")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    session_s = time.perf_counter() - started

    query_started = time.perf_counter()
    schema = StructType(
        [
            StructField("name", StringType(), True),
            StructField("age", LongType(), True),
            StructField("job", StringType(), True),
        ]
    )
    if os.path.isdir(inp) or inp.endswith(".parquet"):
        df = spark.read.schema(schema).parquet(inp)  # plaintext Parquet (bench/formats.py)
    else:
        df = spark.read.option("header", "true").schema(schema).csv(inp)
    count = df.select(F.count("name")).collect()[0][0]
    print(f"count(name): {count}")
    df.select(df["name"], (df["age"] + 1).alias("age + 1")).show(20)
    developers = df.filter((df["job"] == "Developer") & df["age"].between(20, 40))
    developers.write.mode("errorifexists").option("header", "true").csv(out)
    query_s = time.perf_counter() - query_started

    print("RESULT " + json.dumps({"count": count, "session_s": session_s, "query_s": query_s,
                                  "version": spark.version}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
