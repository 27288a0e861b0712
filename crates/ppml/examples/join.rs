//! A join of two encrypted datasets with an aggregate, written encrypted under the data
//! owner's key (`PPML_OUTPUT_KEY`): people per department and their average age.
//!
//! `cargo run --release -p ppml --example join -- people.enc jobs.enc by_department.enc`

use ppml::{PpmlContext, WriteOptions};

#[tokio::main]
async fn main() -> ppml::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (people, jobs, output) = (&args[1], &args[2], &args[3]);

    let ctx = PpmlContext::builder().build().await?;
    ctx.register("people", people.as_str()).await?;
    ctx.register("jobs", jobs.as_str()).await?;
    let by_department = ctx
        .sql(
            "SELECT j.department, count(*) AS people, avg(p.age) AS average_age \
             FROM people p JOIN jobs j ON p.job = j.job \
             GROUP BY j.department ORDER BY j.department",
        )
        .await?;

    // One part, under the owner's key: the owner decrypts it outside any TEE.
    let options = WriteOptions {
        partitions: Some(1),
        ..WriteOptions::default()
    };
    let written = ctx.write(by_department, output.as_str(), options).await?;
    println!("wrote {} rows to {output}", written.rows);
    Ok(())
}
