//! Which operators a ppml runtime runs: an allow-list, failing closed.
//!
//! Local sessions and cluster executors run the same query operators of DataFusion; cluster
//! executors also run Ballista's shuffle nodes (`ppml_cluster::engine`). Not sinks (a plan
//! could write rows in plaintext), `EXPLAIN`/`EXPLAIN ANALYZE` (their output describes the
//! plan and its metrics, not the query), streaming tables, table functions or async UDF
//! evaluation.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_plan::ExecutionPlan;

use crate::{EngineError, Result};

/// DataFusion's query operators that a ppml runtime runs.
pub const QUERY_OPERATORS: &[&str] = &[
    "AggregateExec",
    "BoundedWindowAggExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "CooperativeExec",
    "CrossJoinExec",
    "DataSourceExec",
    "EmptyExec",
    "FilterExec",
    "GlobalLimitExec",
    "HashJoinExec",
    "InterleaveExec",
    "LocalLimitExec",
    "NestedLoopJoinExec",
    "OutputRequirementExec",
    "PartialSortExec",
    "PiecewiseMergeJoinExec",
    "PlaceholderRowExec",
    "ProjectionExec",
    "RepartitionExec",
    "SortExec",
    "SortMergeJoinExec",
    "SortPreservingMergeExec",
    "SymmetricHashJoinExec",
    "UnionExec",
    "UnnestExec",
    "WindowAggExec",
];

/// The operator of a plan node: its name without a variant (`SortExec(TopK)` is a `SortExec`).
pub fn operator_name(node: &dyn ExecutionPlan) -> &str {
    let name = node.name();
    name.split('(').next().unwrap_or(name)
}

/// Refuses a plan with an operator that is neither one of [`QUERY_OPERATORS`] nor in
/// `also_allowed` ([`EngineError::RefusedPlan`], naming the operator).
pub fn check_operators(plan: &Arc<dyn ExecutionPlan>, also_allowed: &[&str]) -> Result<()> {
    let mut refused = None;
    plan.apply(|node| {
        let operator = operator_name(node.as_ref());
        if !(QUERY_OPERATORS.contains(&operator) || also_allowed.contains(&operator)) {
            refused = Some(format!(
                "operator {} is not allowed in a ppml runtime",
                node.name()
            ));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match refused {
        Some(reason) => Err(EngineError::RefusedPlan(reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn plan(sql: &str) -> Arc<dyn ExecutionPlan> {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t (a INT, b TEXT) AS VALUES (1, 'x'), (2, 'y')")
            .await
            .unwrap();
        ctx.sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn queries_pass_and_explain_is_refused() {
        for sql in [
            "SELECT b, count(*) FROM t WHERE a > 1 GROUP BY b ORDER BY b LIMIT 5",
            "SELECT x.a FROM t x JOIN t y ON x.a = y.a UNION ALL SELECT 1",
            "SELECT a, rank() OVER (ORDER BY a) FROM t",
        ] {
            check_operators(&plan(sql).await, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        for sql in ["EXPLAIN SELECT a FROM t", "EXPLAIN ANALYZE SELECT a FROM t"] {
            let refused = check_operators(&plan(sql).await, &[]).unwrap_err();
            assert!(refused.to_string().contains("is not allowed"), "{refused}");
        }
        let only_projection = check_operators(&plan("SELECT 1").await, &["PlaceholderRowExec"]);
        assert!(only_projection.is_ok());
    }
}
