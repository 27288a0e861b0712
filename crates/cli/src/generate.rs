//! `ppml generate people` over [`ppml_engine::people`].

use anyhow::Result;
use ppml_engine::dataset::Durability;
use ppml_engine::people::{Generated, generate_people, write_people};

use crate::cli::GeneratePeopleArgs;
use crate::progress;

pub fn run(args: &GeneratePeopleArgs, quiet: bool, durability: Durability) -> Result<Generated> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let bar = progress::rows(args.rows, "generating", quiet);
    let generated = if args.out.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        write_people(&mut lock, args.rows, seed, |n| bar.set_position(n))?
    } else {
        generate_people(
            &args.out,
            args.rows,
            seed,
            args.overwrite,
            durability,
            |n| bar.set_position(n),
        )?
    };
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "generated {} rows (seed {}) to {}",
            generated.rows,
            generated.seed,
            args.out.display()
        );
    }
    println!("Developers aged 20..=40: {}", generated.developers_20_to_40);
    Ok(generated)
}
