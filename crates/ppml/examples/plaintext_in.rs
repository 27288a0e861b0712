//! Plaintext CSV in, encrypted dataset out (BigDL's `plain_text` input mode): the rows of a
//! plain CSV file, filtered, become an encrypted dataset.
//!
//! `cargo run --release -p ppml --example plaintext_in -- people.csv seniors.enc`

use ppml::datafusion::prelude::{col, lit};
use ppml::{PpmlContext, WriteOptions};

#[tokio::main]
async fn main() -> ppml::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (csv, output) = (&args[1], &args[2]);

    let ctx = PpmlContext::builder().build().await?;
    let seniors = ctx
        .read_plaintext(csv)
        .await?
        .filter(col("age").gt_eq(lit(55)))?;
    let written = ctx
        .write(seniors, output.as_str(), WriteOptions::default())
        .await?;
    println!("wrote {} rows to {output}", written.rows);
    Ok(())
}
