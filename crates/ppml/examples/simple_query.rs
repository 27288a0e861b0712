//! SimpleQuery of the reference workflow as an application of your own: count the people,
//! keep the Developers aged 20 to 40, write them encrypted.
//!
//! `cargo run --release -p ppml --example simple_query -- people.enc developers.enc`, with the
//! KMS of the environment (`PPML_HOME`, or `PPML_KMS_URL`, `PPML_APPID`, `PPML_APIKEY`,
//! `PPML_PRIMARY_KEY`; results under `PPML_OUTPUT_KEY` if set).

use ppml::datafusion::arrow::util::pretty::pretty_format_batches;
use ppml::datafusion::functions_aggregate::expr_fn::count;
use ppml::datafusion::prelude::{col, lit};
use ppml::{PpmlContext, WriteOptions};

#[tokio::main]
async fn main() -> ppml::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (input, output) = (&args[1], &args[2]);

    let ctx = PpmlContext::builder().build().await?;
    let people = ctx.read_csv(input.as_str()).await?;

    let counted = ctx
        .collect(people.clone().aggregate(vec![], vec![count(col("name"))])?)
        .await?;
    println!("{}", pretty_format_batches(&counted)?);

    let developers = people.filter(
        col("job")
            .eq(lit("Developer"))
            .and(col("age").between(lit(20), lit(40))),
    )?;
    let written = ctx
        .write(developers, output.as_str(), WriteOptions::default())
        .await?;
    println!(
        "wrote {} rows in {} part(s) to {output}",
        written.rows, written.parts
    );
    Ok(())
}
