//! What a failed task may say outside the executor.
//!
//! A task's error goes to the scheduler, which is not trusted (docs/cluster.md §1), and from
//! there to the submitter; a cluster-mode driver's error also goes to the job log. Arrow's and
//! DataFusion's own execution errors can quote the data that caused them (`Cannot cast string
//! 'ann' to value of Int32 type`, a CSV parser error with its row), so their messages are
//! withheld and only their kind is reported. ppml's own errors name files, segments and lines,
//! never values, and pass unchanged, as do the I/O and shuffle-fetch failures that Ballista
//! tells apart for retries (it looks at the error's root, which is then left as it is).

use std::error::Error;

use ballista_core::error::BallistaError;
use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Said in place of a withheld message.
pub const WITHHELD: &str = "details withheld outside the TEE, as they can quote data; run the query in local mode to see them";

/// The error to report for a failed task: `error` unchanged when it cannot quote data,
/// otherwise an execution error whose text has the messages that can quote data replaced.
pub fn task_error(error: DataFusionError) -> DataFusionError {
    match error.find_root() {
        DataFusionError::IoError(_) => return error,
        DataFusionError::External(inner) if inner.downcast_ref::<BallistaError>().is_some() => {
            return error;
        }
        _ => {}
    }
    let text = error.to_string();
    let root: &(dyn Error + 'static) = &error;
    match redact(&text, std::iter::successors(Some(root), |e| (*e).source())) {
        Some(redacted) => DataFusionError::Execution(redacted),
        None => error,
    }
}

/// The text of a cluster-mode driver's error (the whole chain, causes not already quoted
/// joined with `: `), with the messages that can quote data replaced.
pub fn driver_error_text(error: &(dyn Error + 'static)) -> String {
    let text = ppml_kms::error_chain(error);
    redact(&text, std::iter::successors(Some(error), |e| (*e).source())).unwrap_or(text)
}

/// `text` with the message of every error in `chain` that can quote data replaced by its
/// kind; `None` when there is none. When such a message cannot be found in `text` (printed
/// some other way), all of `text` is withheld.
fn redact<'a>(
    text: &str,
    chain: impl Iterator<Item = &'a (dyn Error + 'static)>,
) -> Option<String> {
    let mut replacements: Vec<(String, String)> = chain.filter_map(withheld_message).collect();
    if replacements.is_empty() {
        return None;
    }
    // Outer messages contain inner ones: replace the longest first.
    replacements.sort_by_key(|(raw, _)| std::cmp::Reverse(raw.len()));
    let mut redacted = text.to_string();
    for (raw, replacement) in &replacements {
        if raw.is_empty() {
            continue;
        }
        if !redacted.contains(raw.as_str()) {
            return Some(format!("query execution failed: {WITHHELD}"));
        }
        redacted = redacted.replace(raw.as_str(), replacement);
    }
    Some(redacted)
}

/// For an error whose message can quote data: that message, and what to say instead.
fn withheld_message(error: &(dyn Error + 'static)) -> Option<(String, String)> {
    if let Some(arrow) = error.downcast_ref::<ArrowError>() {
        let kind = arrow_kind(arrow)?;
        return Some((arrow.to_string(), format!("Arrow {kind} ({WITHHELD})")));
    }
    match error.downcast_ref::<DataFusionError>() {
        Some(DataFusionError::Execution(message)) => {
            Some((message.clone(), format!("execution error ({WITHHELD})")))
        }
        _ => None,
    }
}

/// The variant name of an Arrow error that carries a message (a cast, parse, CSV or compute
/// error, an overflow...); `None` for I/O errors, wrapped external errors (their own source
/// is looked at) and variants without a message.
fn arrow_kind(error: &ArrowError) -> Option<String> {
    if matches!(
        error,
        ArrowError::IoError(..) | ArrowError::ExternalError(_)
    ) {
        return None;
    }
    let debug = format!("{error:?}");
    let (kind, _) = debug.split_once('(')?;
    Some(kind.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast_error() -> DataFusionError {
        DataFusionError::ArrowError(
            Box::new(ArrowError::CastError(
                "Cannot cast string 'ann' to value of Int32 type".into(),
            )),
            None,
        )
    }

    #[test]
    fn data_in_arrow_and_execution_errors_is_withheld() {
        let error = DataFusionError::Context(
            "Error when processing CSV file part-00001.csv.ppml".into(),
            Box::new(cast_error()),
        );
        let text = task_error(error).to_string();
        assert!(!text.contains("ann"), "{text}");
        assert!(text.contains("part-00001.csv.ppml"), "{text}");
        assert!(text.contains("Arrow CastError (details withheld"), "{text}");

        let shared = DataFusionError::Shared(std::sync::Arc::new(DataFusionError::Execution(
            "Error parsing timestamp from 'bob-secret'".into(),
        )));
        let text = task_error(shared).to_string();
        assert!(!text.contains("bob-secret"), "{text}");
        assert!(text.contains("execution error (details withheld"), "{text}");

        let wrapped = anyhow::Error::new(cast_error()).context("running the query");
        let text = driver_error_text(&*wrapped);
        assert!(!text.contains("ann"), "{text}");
        assert!(text.starts_with("running the query: "), "{text}");
    }

    #[test]
    fn errors_without_data_and_retry_classes_pass_unchanged() {
        let plan = DataFusionError::Plan("table 'people' not found".into());
        assert_eq!(
            task_error(plan).to_string(),
            "Error during planning: table 'people' not found"
        );
        let io = DataFusionError::Context(
            "reading".into(),
            Box::new(DataFusionError::IoError(std::io::Error::other("gone"))),
        );
        assert!(matches!(task_error(io), DataFusionError::Context(..)));
        let fetch = DataFusionError::External(Box::new(BallistaError::FetchFailed(
            "executor-1".into(),
            1,
            2,
            "'ann'".into(),
        )));
        assert!(matches!(task_error(fetch), DataFusionError::External(_)));
        let own = anyhow::anyhow!("out.enc: output already exists");
        assert_eq!(driver_error_text(&*own), "out.enc: output already exists");
        let divide = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None);
        assert_eq!(
            task_error(divide).to_string(),
            "Arrow error: Divide by zero error"
        );
    }

    #[test]
    fn a_message_printed_some_other_way_withholds_everything() {
        let chain: [&(dyn Error + 'static); 1] = [&ArrowError::ParseError("'ann'".into())];
        let text = redact("it failed on ann", chain.into_iter()).unwrap();
        assert!(!text.contains("ann"), "{text}");
    }
}
