//! The people.csv generator of the reference workflow.
//!
//! Same format and distribution as the original generate_people_csv.py: header `name,age,job`;
//! name of 3..=7 letters (length uniform), each letter uniform in a..z; age uniform in 18..=60;
//! job uniform among Developer, Engineer, Researcher. Rows are produced and written one buffer
//! at a time, so memory does not grow with the row count.

use std::io::Write;

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::dataset::Durability;
use crate::output::AtomicFile;
use crate::{EngineError, Result};

/// The jobs of the people file, in the generator's order.
pub const JOBS: [&str; 3] = ["Developer", "Engineer", "Researcher"];
const FLUSH_AT: usize = 1 << 20;
const PROGRESS_EVERY: u64 = 1 << 16;

/// Summary of a generated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generated {
    /// Data rows written (the header excluded).
    pub rows: u64,
    /// Rows SimpleQuery keeps: Developers aged 20 to 40, both included.
    pub developers_20_to_40: u64,
    /// The seed the rows came from.
    pub seed: u64,
}

/// Writes `rows` people rows (after the header) to `out`, calling `progress(rows_done)` now and
/// then.
pub fn write_people<W: Write>(
    out: &mut W,
    rows: u64,
    seed: u64,
    mut progress: impl FnMut(u64),
) -> std::io::Result<Generated> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = Vec::with_capacity(FLUSH_AT + 64);
    buf.extend_from_slice(b"name,age,job\n");
    let mut developers = 0u64;
    for row in 0..rows {
        let len = rng.random_range(3..=7);
        for _ in 0..len {
            buf.push(b'a' + rng.random_range(0..26u8));
        }
        let age: u8 = rng.random_range(18..=60);
        let job = rng.random_range(0..JOBS.len());
        buf.push(b',');
        buf.push(b'0' + age / 10);
        buf.push(b'0' + age % 10);
        buf.push(b',');
        buf.extend_from_slice(JOBS[job].as_bytes());
        buf.push(b'\n');
        if job == 0 && (20..=40).contains(&age) {
            developers += 1;
        }
        if buf.len() >= FLUSH_AT {
            out.write_all(&buf)?;
            buf.clear();
        }
        if row % PROGRESS_EVERY == 0 {
            progress(row);
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    progress(rows);
    Ok(Generated {
        rows,
        developers_20_to_40: developers,
        seed,
    })
}

/// Writes a people file of `rows` rows to `path`, appearing only when complete (refused if
/// it exists, unless `overwrite`); calls `progress(rows_done)` now and then.
pub fn generate_people(
    path: &Path,
    rows: u64,
    seed: u64,
    overwrite: bool,
    durability: Durability,
    progress: impl FnMut(u64),
) -> Result<Generated> {
    let mut file = AtomicFile::create(path, overwrite, durability)?;
    let generated =
        write_people(&mut file, rows, seed, progress).map_err(|e| EngineError::io(path, e))?;
    file.commit()?;
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_file_and_format_holds() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let ga = write_people(&mut a, 5000, 42, |_| {}).unwrap();
        let gb = write_people(&mut b, 5000, 42, |_| {}).unwrap();
        assert_eq!(a, b);
        assert_eq!(ga, gb);
        let text = String::from_utf8(a).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("name,age,job"));
        let mut developers = 0;
        let mut count = 0;
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 3, "{line}");
            assert!((3..=7).contains(&fields[0].len()), "{line}");
            assert!(fields[0].bytes().all(|c| c.is_ascii_lowercase()), "{line}");
            let age: u32 = fields[1].parse().unwrap();
            assert!((18..=60).contains(&age), "{line}");
            assert!(JOBS.contains(&fields[2]), "{line}");
            if fields[2] == "Developer" && (20..=40).contains(&age) {
                developers += 1;
            }
            count += 1;
        }
        assert_eq!(count, 5000);
        assert_eq!(developers, ga.developers_20_to_40);
    }

    #[test]
    fn distribution_matches_the_original() {
        let mut out = Vec::new();
        let g = write_people(&mut out, 200_000, 7, |_| {}).unwrap();
        // P(Developer) * P(20 <= age <= 40) = 1/3 * 21/43 = 16.28 %.
        let share = g.developers_20_to_40 as f64 / g.rows as f64;
        assert!((share - 0.1628).abs() < 0.005, "share {share}");
        let text = String::from_utf8(out).unwrap();
        let mut name_lengths = [0u64; 8];
        let mut ages = [0u64; 61];
        for line in text.lines().skip(1) {
            let mut f = line.split(',');
            name_lengths[f.next().unwrap().len()] += 1;
            ages[f.next().unwrap().parse::<usize>().unwrap()] += 1;
        }
        for (len, &n) in name_lengths.iter().enumerate().skip(3) {
            let p = n as f64 / g.rows as f64;
            assert!((p - 0.2).abs() < 0.01, "name length {len}: {p}");
        }
        assert!(ages[18] > 0 && ages[60] > 0 && ages[17] == 0);
    }

    #[test]
    fn different_seeds_differ() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_people(&mut a, 100, 1, |_| {}).unwrap();
        write_people(&mut b, 100, 2, |_| {}).unwrap();
        assert_ne!(a, b);
    }
}
