//! The SimpleQuery program in client mode: this process is the driver, the executors of a
//! ppml cluster (`ppml cluster up`) decrypt, filter and shuffle (encrypted); the result is
//! written encrypted.
//!
//! `cargo run --release -p ppml --example client_mode -- 127.0.0.1:50050 ~/.ppml/cluster/tls \
//!  people.enc developers.enc`

use std::path::Path;

use ppml::datafusion::prelude::{col, lit};
use ppml::{PpmlContext, WriteOptions, client_mode};

#[tokio::main]
async fn main() -> ppml::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (master, tls, input, output) = (&args[1], &args[2], &args[3], &args[4]);

    let ctx = PpmlContext::builder()
        .placement(client_mode(master.as_str(), Some(Path::new(tls)))?)
        .build()
        .await?;
    let developers = ctx.read_csv(input.as_str()).await?.filter(
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
