//! Stage plans signed by the job's driver, and the checks that make executors run only them
//! (docs/cluster.md §6.6).
//!
//! The scheduler, outside the TEE, cuts a submitted plan into stages and hands each task its
//! stage's plan restricted to the task's partitions. Whoever holds a cluster certificate can
//! submit plans, and copying a granted job's settings (its wrapped shuffle key and grant) would
//! let it run stages of its own over the granted inputs and read Ballista's task statistics
//! (rows per shuffle partition) as an oracle. So:
//!
//! - The driver cuts its plan with the same planner ([`plan_stages`]) and MACs the encoded
//!   stage plans with a key derived from the job's shuffle key, which only attested runtimes
//!   hold ([`SignedStages`], the `ppml.stages` setting).
//! - An executor runs the signed stage, never the scheduler's plan ([`task_plan`]). From the
//!   scheduler's plan it takes only what is the scheduler's to decide: which of the stage's
//!   partitions the task computes and where its input files are. It restricts the signed
//!   stage to those partitions itself (with Ballista's own function) and refuses the task
//!   unless the scheduler's plan is exactly that restriction.
//! - Each shuffle file names the partitions it was computed from
//!   ([`crate::shuffle::MapPartitions`]), and a reader checks that the files it reads for a
//!   partition come from disjoint tasks that together cover every partition of the producing
//!   stage that feeds it ([`Feeding`]): a withheld or duplicated map output is refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ballista_core::JobId;
use ballista_core::execution_plans::{
    ShuffleReaderExec, ShuffleWriter, UnresolvedShuffleExec, compute_global_output_partition_ids,
};
use ballista_core::serde::scheduler::{
    ExecutorMetadata, ExecutorOperatingSystemSpecification, ExecutorSpecification, PartitionId,
    PartitionLocation, PartitionStats,
};
use ballista_scheduler::planner::{DefaultDistributedPlanner, DistributedPlanner as _};
use ballista_scheduler::state::task_builder::restrict_plan_to_partitions;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result as DataFusionResult;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{Distribution, ExecutionPlan, ExecutionPlanProperties};
use futures::{Stream, StreamExt};
use ring::{hkdf, hmac};

use crate::ClusterError;
use crate::driver::{decode_plan, encode_plan};
use crate::shuffle::{MapPartitions, MapPartitionsCheck, ShuffleKey};

/// Domain separation of the stage plans' MAC key and MAC input.
pub const STAGES_DOMAIN: &[u8] = b"ppml-stages/1";
/// Largest accepted `ppml.stages` value (base64url text).
pub const MAX_STAGES_TEXT: usize = 16 << 20;
/// Most input or output partitions of one stage whose cover a reader checks (real stages have
/// about as many as the cluster has cores).
pub const MAX_STAGE_PARTITIONS: usize = 4096;
/// Length of the MAC that ends the decoded `ppml.stages` value.
const MAC_LEN: usize = 32;
/// The job id inside the placeholder locations [`task_plan`] plants to track partitions.
const PLACEHOLDER_JOB: &str = "ppml-signed-stage";

/// Cuts `plan` into stages exactly as the scheduler does: Ballista's static planner with the
/// job's configuration (a submitted physical plan is always planned statically, docs/cluster.md
/// §5), over the plan as the scheduler receives it (through ppml's codec, which does not carry
/// every detail of every operator). The last stage is the final one.
pub fn plan_stages(
    plan: &Arc<dyn ExecutionPlan>,
    config: &ConfigOptions,
    ctx: &TaskContext,
) -> Result<Vec<Arc<dyn ShuffleWriter>>, ClusterError> {
    let received = decode_plan(&encode_plan(plan)?, ctx)?;
    let stages = DefaultDistributedPlanner::new().plan_query_stages(
        &JobId::new("signed-stages"),
        received,
        config,
    )?;
    if stages.is_empty() {
        return Err(ClusterError::Plan("the plan makes no stage".into()));
    }
    Ok(stages)
}

/// The stage plans of one job, encoded with ppml's plan codec, by stage id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedStages {
    plans: BTreeMap<u32, Vec<u8>>,
}

impl SignedStages {
    /// Encodes the stages [`plan_stages`] made.
    pub fn from_stages(stages: &[Arc<dyn ShuffleWriter>]) -> Result<Self, ClusterError> {
        let mut plans = BTreeMap::new();
        for stage in stages {
            let id = u32::try_from(stage.stage_id())
                .map_err(|_| ClusterError::Plan("stage id out of range".into()))?;
            let plan: Arc<dyn ExecutionPlan> = stage.clone();
            plans.insert(id, encode_plan(&plan)?);
        }
        Ok(SignedStages { plans })
    }

    /// The `ppml.stages` value: base64url (no padding) of the body
    /// `u32 count ‖ (u32 stage_id ‖ u32 len ‖ plan)*` (ascending stage ids, big-endian)
    /// followed by HMAC-SHA256 over `"ppml-stages/1" ‖ u32 len(job_id) ‖ job_id ‖ body`
    /// under [`mac_key`] of the job's shuffle key.
    pub fn sign(&self, job_id: &str, key: &ShuffleKey) -> String {
        let body = self.body();
        let tag = hmac::sign(&mac_key(key), &mac_input(job_id, &body));
        let mut value = body;
        value.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(value)
    }

    /// Reads a `ppml.stages` value, refusing it unless its MAC verifies under the key of
    /// job `job_id` (constant-time comparison).
    pub fn verify(text: &str, job_id: &str, key: &ShuffleKey) -> Result<Self, ClusterError> {
        let refused = |why: &str| ClusterError::StagePlan(format!("ppml.stages: {why}"));
        if text.len() > MAX_STAGES_TEXT {
            return Err(refused("too large"));
        }
        let value = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| refused("not base64url"))?;
        let Some(split) = value.len().checked_sub(MAC_LEN) else {
            return Err(refused("too short"));
        };
        let (body, tag) = value.split_at(split);
        hmac::verify(&mac_key(key), &mac_input(job_id, body), tag).map_err(|_| {
            refused("the MAC does not verify: these stage plans were not made by this job's driver")
        })?;
        Self::parse_body(body).ok_or_else(|| refused("malformed"))
    }

    /// The encoded plan of stage `stage_id`.
    pub fn encoded(&self, stage_id: usize) -> Option<&[u8]> {
        let id = u32::try_from(stage_id).ok()?;
        self.plans.get(&id).map(Vec::as_slice)
    }

    /// The ids of the stages, ascending.
    pub fn stage_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.plans.keys().map(|&id| id as usize)
    }

    /// Decodes the plan of stage `stage_id` (its root is the stage's shuffle writer, its
    /// inputs from other stages `UnresolvedShuffleExec`s).
    pub fn stage(
        &self,
        stage_id: usize,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn ExecutionPlan>, ClusterError> {
        let bytes = self.encoded(stage_id).ok_or_else(|| {
            ClusterError::StagePlan(format!("the job's driver planned no stage {stage_id}"))
        })?;
        decode_plan(bytes, ctx)
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.plans.len() as u32).to_be_bytes());
        for (id, plan) in &self.plans {
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&(plan.len() as u32).to_be_bytes());
            body.extend_from_slice(plan);
        }
        body
    }

    fn parse_body(body: &[u8]) -> Option<Self> {
        fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
            Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        }
        let count = u32_at(body, 0)?;
        let mut at = 4;
        let mut plans = BTreeMap::new();
        let mut last = None;
        for _ in 0..count {
            let id = u32_at(body, at)?;
            let len = u32_at(body, at + 4)? as usize;
            at += 8;
            let plan = body.get(at..at.checked_add(len)?)?;
            at += len;
            // Ascending ids: one stage set has one encoding.
            if last.is_some_and(|last| last >= id) {
                return None;
            }
            last = Some(id);
            plans.insert(id, plan.to_vec());
        }
        (at == body.len() && !plans.is_empty()).then_some(SignedStages { plans })
    }
}

/// HMAC-SHA256 key of the stage plans: HKDF-SHA256 of the job's shuffle data key, salt
/// `"ppml-stages/1"`, info `"stage plans mac"`. Separate from the keys the data key encrypts
/// shuffle files with (those come from per-file salts, docs/file-format.md).
fn mac_key(key: &ShuffleKey) -> hmac::Key {
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, STAGES_DOMAIN).extract(key.data_key().expose_secret());
    let okm = prk
        .expand(&[b"stage plans mac"], hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is a valid HKDF output length");
    hmac::Key::from(okm)
}

fn mac_input(job_id: &str, body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(STAGES_DOMAIN.len() + 4 + job_id.len() + body.len());
    input.extend_from_slice(STAGES_DOMAIN);
    input.extend_from_slice(&(job_id.len() as u32).to_be_bytes());
    input.extend_from_slice(job_id.as_bytes());
    input.extend_from_slice(body);
    input
}

/// One shuffle reader of a task's plan: its place (in the order readers appear as leaves,
/// left to right), the scheduler's file lists, and which of the producing stage's output
/// partitions each list holds.
#[derive(Clone, Debug)]
pub struct ReaderInput {
    /// The producing stage.
    pub stage_id: usize,
    /// A broadcast reader (all partitions of its stage, in one list).
    pub broadcast: bool,
    /// The scheduler's file lists, one per partition of the reader.
    pub partition: Vec<Vec<PartitionLocation>>,
    /// The producing stage's output partition each list must hold (for a broadcast reader,
    /// every output partition of the stage, all in the one list).
    pub partition_ids: Vec<usize>,
}

/// What a task runs.
#[derive(Debug)]
pub struct TaskPlan {
    /// The signed stage restricted to the task's partitions. Its shuffle readers hold
    /// placeholder lists: the real ones are in `readers`.
    pub plan: Arc<dyn ExecutionPlan>,
    /// The stage's partitions the task computes, ascending.
    pub partitions: Vec<usize>,
    /// The readers' inputs, in leaf order (left to right) of `plan`.
    pub readers: Vec<ReaderInput>,
}

impl TaskPlan {
    /// The map partitions the task's output files name.
    pub fn map_partitions(&self) -> MapPartitions {
        MapPartitions::new(self.partitions.iter().map(|&p| p as u32))
    }

    /// The stage's output partitions the task writes, in the order of its writer's child's
    /// partitions (Ballista's own rule, from the signed stage and the task's partitions).
    pub fn output_partitions(&self, signed: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
        compute_global_output_partition_ids(signed, &self.partitions)
    }
}

fn mismatch(stage_id: usize, why: impl std::fmt::Display) -> ClusterError {
    ClusterError::StagePlan(format!(
        "the task's plan is not stage {stage_id} as the job's driver planned it: {why}"
    ))
}

/// The plan a task of stage `stage_id` runs: the signed stage `signed`, restricted to the
/// partitions the scheduler's task plan `received` covers, with the input file lists of
/// `received`'s shuffle readers. Refused unless `received` is exactly that restriction:
/// the same operators, the same scans, readers of the same stages, each list holding the
/// partition it must. Nothing else of `received` is used.
pub fn task_plan(
    stage_id: usize,
    signed: &Arc<dyn ExecutionPlan>,
    received: &Arc<dyn ExecutionPlan>,
) -> Result<TaskPlan, ClusterError> {
    let placeholders = with_placeholder_readers(stage_id, signed)?;
    let mut owned = BTreeSet::new();
    infer_partitions(stage_id, &placeholders, received, 0, false, &mut owned)?;
    let stage_partitions = signed
        .children()
        .first()
        .map(|child| child.output_partitioning().partition_count())
        .ok_or_else(|| mismatch(stage_id, "the signed stage has no input"))?;
    if owned.is_empty() {
        // Only leaves that do not say which partitions they hold (placeholder rows, inputs
        // read whole): fine when the stage has a single partition.
        if stage_partitions == 1 {
            owned.insert(0);
        } else {
            return Err(mismatch(
                stage_id,
                "it does not show which partitions it computes",
            ));
        }
    }
    if owned.iter().any(|&p| p >= stage_partitions) {
        return Err(mismatch(
            stage_id,
            format!("a partition beyond the stage's {stage_partitions}"),
        ));
    }
    let partitions: Vec<usize> = owned.into_iter().collect();
    let restricted = restrict_plan_to_partitions(placeholders, &partitions)?;
    let mut readers = Vec::new();
    match_leaves(stage_id, &restricted, received, &mut readers)?;
    Ok(TaskPlan {
        plan: restricted,
        partitions,
        readers,
    })
}

/// `signed` with each `UnresolvedShuffleExec` replaced by the `ShuffleReaderExec` the
/// scheduler makes of it, holding one placeholder location per partition that names the
/// partition: after restriction, each remaining list still says which partition it is.
fn with_placeholder_readers(
    stage_id: usize,
    signed: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>, ClusterError> {
    let resolved = signed.clone().transform_up(|node| {
        let Some(unresolved) = node.downcast_ref::<UnresolvedShuffleExec>() else {
            return Ok(Transformed::no(node));
        };
        if unresolved.coalesce.is_some() {
            return Err(mismatch(stage_id, "a coalesced shuffle read (adaptive planning)").into());
        }
        if unresolved
            .output_partition_count
            .max(unresolved.upstream_partition_count)
            > MAX_STAGE_PARTITIONS
        {
            return Err(mismatch(stage_id, "a shuffle read of too many partitions").into());
        }
        let input = unresolved.stage_id;
        let reader = if unresolved.broadcast {
            let all = (0..unresolved.upstream_partition_count)
                .map(|p| placeholder(input, p))
                .collect();
            ShuffleReaderExec::try_new_broadcast(
                input,
                all,
                unresolved.schema.clone(),
                unresolved.upstream_partition_count,
            )?
        } else {
            let lists = (0..unresolved.output_partition_count)
                .map(|p| vec![placeholder(input, p)])
                .collect();
            ShuffleReaderExec::try_new(
                input,
                lists,
                unresolved.schema.clone(),
                unresolved.properties().output_partitioning().clone(),
            )?
        };
        Ok(Transformed::yes(Arc::new(reader) as Arc<dyn ExecutionPlan>))
    })?;
    Ok(resolved.data)
}

fn placeholder(stage_id: usize, partition: usize) -> PartitionLocation {
    PartitionLocation {
        map_partition_id: 0,
        partition_id: PartitionId::new(&JobId::new(PLACEHOLDER_JOB), stage_id, partition),
        executor_meta: ExecutorMetadata {
            id: String::new(),
            host: String::new(),
            port: 0,
            grpc_port: 0,
            specification: ExecutorSpecification::default(),
            os_info: ExecutorOperatingSystemSpecification::default(),
        },
        partition_stats: PartitionStats::default(),
        file_id: None,
        is_sort_shuffle: false,
    }
}

/// Whether each child of `plan` reads its input whole (Ballista's rule in
/// `task_builder::child_scopes`: below a collapse, or a child that must be one partition).
fn children_read_whole(plan: &Arc<dyn ExecutionPlan>, under_collect: bool) -> Vec<bool> {
    let count = plan.children().len();
    if under_collect || plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>()
    {
        return vec![true; count];
    }
    let required = plan.input_distribution_requirements();
    let per_child = required.per_child_distributions();
    if per_child.len() != count {
        return vec![false; count];
    }
    per_child
        .map(|d| matches!(d, Distribution::SinglePartition))
        .collect()
}

/// The (path, byte range) of each file of a scan partition: what identifies it.
fn group_key(
    group: &datafusion::datasource::physical_plan::FileGroup,
) -> Vec<(String, Option<(i64, i64)>)> {
    group
        .files()
        .iter()
        .map(|file| {
            (
                file.object_meta.location.to_string(),
                file.range.as_ref().map(|r| (r.start, r.end)),
            )
        })
        .collect()
}

fn file_scan(plan: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    plan.downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()
}

/// `received` as a reader of the same stage, in the same way, as the signed `reader`.
fn same_reader<'a>(
    stage_id: usize,
    reader: &ShuffleReaderExec,
    received: &'a Arc<dyn ExecutionPlan>,
) -> Result<&'a ShuffleReaderExec, ClusterError> {
    let Some(got) = received.downcast_ref::<ShuffleReaderExec>() else {
        return Err(mismatch(
            stage_id,
            format!("{} in place of a shuffle read", received.name()),
        ));
    };
    if got.stage_id != reader.stage_id || got.broadcast != reader.broadcast {
        return Err(mismatch(
            stage_id,
            format!(
                "a read of stage {} in place of stage {}",
                got.stage_id, reader.stage_id
            ),
        ));
    }
    Ok(got)
}

/// `received` as a file scan, where the signed stage scans files.
fn same_scan(
    stage_id: usize,
    received: &Arc<dyn ExecutionPlan>,
) -> Result<&FileScanConfig, ClusterError> {
    file_scan(received)
        .ok_or_else(|| mismatch(stage_id, format!("{} in place of a scan", received.name())))
}

/// Collects the stage partitions `received`'s leaves hold, walking it beside the signed
/// stage (`offset`: where the current subtree's partitions start among the stage's, which
/// only a union shifts). Refuses any difference in the operators on the way.
fn infer_partitions(
    stage_id: usize,
    signed: &Arc<dyn ExecutionPlan>,
    received: &Arc<dyn ExecutionPlan>,
    offset: usize,
    read_whole: bool,
    owned: &mut BTreeSet<usize>,
) -> Result<(), ClusterError> {
    if let Some(reader) = signed.downcast_ref::<ShuffleReaderExec>() {
        let got = same_reader(stage_id, reader, received)?;
        if !read_whole && !reader.broadcast {
            for list in &got.partition {
                if let Some(first) = list.first() {
                    owned.insert(offset + first.partition_id.partition_id);
                }
            }
        }
        return Ok(());
    }
    if let Some(scan) = file_scan(signed) {
        let got = same_scan(stage_id, received)?;
        if !read_whole {
            let planned: Vec<_> = scan.file_groups.iter().map(group_key).collect();
            for group in &got.file_groups {
                let key = group_key(group);
                let index = planned
                    .iter()
                    .position(|g| *g == key)
                    .ok_or_else(|| mismatch(stage_id, "a scan of files the driver did not plan"))?;
                owned.insert(offset + index);
            }
        }
        return Ok(());
    }
    let (signed_children, received_children) = (signed.children(), received.children());
    if signed_children.is_empty() {
        return Ok(()); // Other leaves are compared after the restriction.
    }
    if signed.name() != received.name() || signed_children.len() != received_children.len() {
        return Err(mismatch(
            stage_id,
            format!("{} in place of {}", received.name(), signed.name()),
        ));
    }
    if !read_whole && signed.is::<UnionExec>() {
        let mut start = offset;
        for (s, r) in signed_children.into_iter().zip(received_children) {
            infer_partitions(stage_id, s, r, start, false, owned)?;
            start += s.output_partitioning().partition_count();
        }
        return Ok(());
    }
    let whole = children_read_whole(signed, read_whole);
    for ((s, r), whole) in signed_children
        .into_iter()
        .zip(received_children)
        .zip(whole)
    {
        infer_partitions(stage_id, s, r, offset, whole, owned)?;
    }
    Ok(())
}

/// Compares the restricted signed stage with the scheduler's plan leaf by leaf (operators on
/// the way by name) and collects the scheduler's reader lists, in leaf order.
fn match_leaves(
    stage_id: usize,
    expected: &Arc<dyn ExecutionPlan>,
    received: &Arc<dyn ExecutionPlan>,
    readers: &mut Vec<ReaderInput>,
) -> Result<(), ClusterError> {
    if let Some(reader) = expected.downcast_ref::<ShuffleReaderExec>() {
        let got = same_reader(stage_id, reader, received)?;
        // Each placeholder list names the partition it stands for.
        let partition_ids: Vec<usize> = reader
            .partition
            .iter()
            .flatten()
            .map(|l| l.partition_id.partition_id)
            .collect();
        if reader.broadcast {
            if got.partition.len() != 1 {
                return Err(mismatch(stage_id, "a broadcast read that is not one list"));
            }
        } else {
            if got.partition.len() != reader.partition.len() {
                return Err(mismatch(
                    stage_id,
                    format!(
                        "a read of {} partitions of stage {} where the task owns {}",
                        got.partition.len(),
                        reader.stage_id,
                        reader.partition.len()
                    ),
                ));
            }
            for (list, &id) in got.partition.iter().zip(&partition_ids) {
                if let Some(other) = list.iter().find(|l| l.partition_id.partition_id != id) {
                    return Err(mismatch(
                        stage_id,
                        format!(
                            "partition {} of stage {} read in place of partition {id}",
                            other.partition_id.partition_id, reader.stage_id
                        ),
                    ));
                }
            }
        }
        readers.push(ReaderInput {
            stage_id: reader.stage_id,
            broadcast: reader.broadcast,
            partition: got.partition.clone(),
            partition_ids,
        });
        return Ok(());
    }
    if let Some(scan) = file_scan(expected) {
        let got = same_scan(stage_id, received)?;
        let want: Vec<_> = scan.file_groups.iter().map(group_key).collect();
        let have: Vec<_> = got.file_groups.iter().map(group_key).collect();
        if want != have {
            return Err(mismatch(stage_id, "a scan of other parts of its input"));
        }
        return Ok(());
    }
    let (expected_children, received_children) = (expected.children(), received.children());
    if expected.name() != received.name() || expected_children.len() != received_children.len() {
        return Err(mismatch(
            stage_id,
            format!("{} in place of {}", received.name(), expected.name()),
        ));
    }
    if expected_children.is_empty() {
        // Leaves that make rows of their own (values, placeholder rows, an emptied source):
        // the signed one runs, so only its number of partitions, which the restriction
        // decides, is compared.
        if expected.output_partitioning().partition_count()
            != received.output_partitioning().partition_count()
        {
            return Err(mismatch(stage_id, format!("another {}", expected.name())));
        }
        return Ok(());
    }
    for (e, r) in expected_children.into_iter().zip(received_children) {
        match_leaves(stage_id, e, r, readers)?;
    }
    Ok(())
}

/// Which partitions of a producing stage feed each of its output partitions, from its
/// signed plan: all of them for a hash or round-robin exchange (and a collapse), only the
/// same partition for a pass-through stage.
#[derive(Clone, Debug)]
pub struct Feeding {
    stage_id: usize,
    map_partitions: usize,
    by_output: HashMap<usize, BTreeSet<u32>>,
}

impl Feeding {
    /// The feeding of the stage whose signed plan is `stage` (its root a shuffle writer).
    pub fn of(stage_id: usize, stage: &Arc<dyn ExecutionPlan>) -> Result<Self, ClusterError> {
        let map_partitions = stage
            .children()
            .first()
            .map(|child| child.output_partitioning().partition_count())
            .ok_or_else(|| ClusterError::StagePlan(format!("stage {stage_id} has no input")))?;
        let too_many = |what: &str, count: usize| {
            ClusterError::StagePlan(format!(
                "stage {stage_id} has {count} {what} partitions (at most {MAX_STAGE_PARTITIONS})"
            ))
        };
        if map_partitions > MAX_STAGE_PARTITIONS {
            return Err(too_many("input", map_partitions));
        }
        let mut by_output: HashMap<usize, BTreeSet<u32>> = HashMap::new();
        for p in 0..map_partitions {
            let outputs = compute_global_output_partition_ids(stage, &[p]);
            if outputs.len() > MAX_STAGE_PARTITIONS {
                return Err(too_many("output", outputs.len()));
            }
            for q in outputs {
                by_output.entry(q).or_default().insert(p as u32);
            }
        }
        Ok(Feeding {
            stage_id,
            map_partitions,
            by_output,
        })
    }

    /// A checker of the files one reader partition reads for output partitions `outputs`.
    pub fn coverage(self: &Arc<Self>, outputs: Vec<usize>) -> Coverage {
        Coverage {
            feeding: self.clone(),
            outputs,
            seen: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }
}

/// Checks the files read for some output partitions of a stage: each file's map partitions
/// feed the partition it holds and overlap no other file's of that partition
/// ([`Coverage::record`]), and together they cover every map partition that feeds it
/// ([`Coverage::finish`]).
#[derive(Clone, Debug)]
pub struct Coverage {
    feeding: Arc<Feeding>,
    outputs: Vec<usize>,
    seen: Arc<std::sync::Mutex<HashMap<usize, BTreeSet<u32>>>>,
}

impl Coverage {
    /// Records a file of output partition `output` computed from `map_partitions`.
    pub fn record(&self, output: usize, map_partitions: &MapPartitions) -> Result<(), String> {
        let stage = self.feeding.stage_id;
        if !self.outputs.contains(&output) {
            return Err(format!(
                "stage {stage} partition {output} is not one this reader reads"
            ));
        }
        if let Some(&beyond) = map_partitions
            .as_slice()
            .iter()
            .find(|&&p| p as usize >= self.feeding.map_partitions)
        {
            return Err(format!(
                "computed from partition {beyond}, beyond stage {stage}'s {}",
                self.feeding.map_partitions
            ));
        }
        let feeds = self.feeding.by_output.get(&output);
        if !map_partitions
            .as_slice()
            .iter()
            .any(|p| feeds.is_some_and(|feeds| feeds.contains(p)))
        {
            return Err(format!(
                "computed from partitions {} of stage {stage}, none of which feeds its partition {output}",
                map_partitions.to_text()
            ));
        }
        let mut seen = self.seen.lock().expect("coverage lock");
        let seen = seen.entry(output).or_default();
        if let Some(&twice) = map_partitions.as_slice().iter().find(|p| seen.contains(p)) {
            return Err(format!(
                "stage {stage} partition {output}: the rows of map partition {twice} are read twice"
            ));
        }
        seen.extend(map_partitions.as_slice());
        Ok(())
    }

    /// The check to give the reader of a file of output partition `output`
    /// ([`Coverage::record`] when the file names its map partitions).
    pub fn file_check(&self, output: usize) -> MapPartitionsCheck {
        let coverage = self.clone();
        Box::new(move |map_partitions| coverage.record(output, map_partitions))
    }

    /// After the last file: every map partition feeding each output partition was read.
    pub fn finish(&self) -> Result<(), ClusterError> {
        let stage = self.feeding.stage_id;
        let seen = self.seen.lock().expect("coverage lock");
        for output in &self.outputs {
            let Some(feeds) = self.feeding.by_output.get(output) else {
                continue;
            };
            let read = seen.get(output);
            let missing: Vec<u32> = feeds
                .iter()
                .filter(|p| !read.is_some_and(|read| read.contains(p)))
                .copied()
                .collect();
            if !missing.is_empty() {
                return Err(ClusterError::ShuffleFiles(format!(
                    "stage {stage} partition {output}: the files of map partitions {} are missing",
                    MapPartitions::new(missing).to_text()
                )));
            }
        }
        Ok(())
    }

    /// `files` (the record batches of the files this coverage checks, each opened with its
    /// [`Coverage::file_check`]), ending with the error of [`Coverage::finish`] if their files
    /// do not cover the stage.
    pub fn ending<S>(self, files: S) -> impl Stream<Item = DataFusionResult<RecordBatch>> + Send
    where
        S: Stream<Item = DataFusionResult<RecordBatch>> + Send,
    {
        let end = futures::stream::once(async move { self.finish() })
            .filter_map(|checked| async move { checked.err().map(|e| Err(e.into())) });
        files.chain(end)
    }
}

#[cfg(test)]
mod tests {
    use ballista_scheduler::planner::remove_unresolved_shuffles;
    use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
    use ppml_format::{DataKey, KeyReference};

    use super::*;

    fn key(byte: u8) -> ShuffleKey {
        ShuffleKey::new(
            DataKey::from_bytes([byte; 32]),
            KeyReference::new("local:test", "primary", vec![byte]),
        )
    }

    /// A grouped count over four CSV files: a scan stage hash-partitioned into four buckets,
    /// then the final stage, which aggregates each bucket.
    async fn planned() -> (
        SessionContext,
        Vec<Arc<dyn ShuffleWriter>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..4 {
            std::fs::write(
                dir.path().join(format!("{i}.csv")),
                format!("a,b\n{i},x\n1,y\n"),
            )
            .unwrap();
        }
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(4));
        ctx.register_csv("t", dir.path().to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        let stages = stages_of(&ctx, "SELECT a, count(*) FROM t WHERE b <> 'z' GROUP BY a").await;
        (ctx, stages, dir)
    }

    /// The stages of `sql`, as a driver plans them.
    async fn stages_of(ctx: &SessionContext, sql: &str) -> Vec<Arc<dyn ShuffleWriter>> {
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        plan_stages(&plan, ctx.copied_config().options(), &ctx.task_ctx()).unwrap()
    }

    fn location(stage: usize, partition: usize, file: u64) -> PartitionLocation {
        let mut l = placeholder(stage, partition);
        l.partition_id = PartitionId::new(&JobId::new("job"), stage, partition);
        l.file_id = Some(file);
        l
    }

    /// What the scheduler sends a task: the stage with its inputs resolved to `files`
    /// (`stage → partition → locations`), restricted to `partitions`, through the wire.
    fn scheduled(
        ctx: &SessionContext,
        stage: &Arc<dyn ShuffleWriter>,
        files: &HashMap<usize, HashMap<usize, Vec<PartitionLocation>>>,
        partitions: &[usize],
    ) -> Arc<dyn ExecutionPlan> {
        let plan: Arc<dyn ExecutionPlan> = stage.clone();
        let resolved = remove_unresolved_shuffles(plan, files).unwrap();
        let restricted = restrict_plan_to_partitions(resolved, partitions).unwrap();
        decode_plan(&encode_plan(&restricted).unwrap(), &ctx.task_ctx()).unwrap()
    }

    /// Every map task of stage 1 (two tasks of two partitions each) wrote all four buckets.
    fn stage_one_files() -> HashMap<usize, HashMap<usize, Vec<PartitionLocation>>> {
        let buckets = (0..4)
            .map(|q| (q, vec![location(1, q, 10), location(1, q, 11)]))
            .collect();
        HashMap::from([(1, buckets)])
    }

    /// The two stages of [`planned`], as executors decode them from `ppml.stages`.
    fn signed_stages(
        ctx: &SessionContext,
        stages: &[Arc<dyn ShuffleWriter>],
    ) -> (Arc<dyn ExecutionPlan>, Arc<dyn ExecutionPlan>) {
        let signed = SignedStages::from_stages(stages).unwrap();
        let task_ctx = ctx.task_ctx();
        (
            signed.stage(1, &task_ctx).unwrap(),
            signed.stage(2, &task_ctx).unwrap(),
        )
    }

    fn refusal(result: Result<TaskPlan, ClusterError>) -> String {
        match result {
            Err(ClusterError::StagePlan(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn stage_plans_verify_only_under_their_jobs_key() {
        let (_ctx, stages, _dir) = planned().await;
        let signed = SignedStages::from_stages(&stages).unwrap();
        assert_eq!(signed.stage_ids().collect::<Vec<_>>(), vec![1, 2]);
        let text = signed.sign("job-1", &key(7));
        assert_eq!(
            SignedStages::verify(&text, "job-1", &key(7)).unwrap(),
            signed
        );

        let refused =
            |text: &str, job: &str, key: &ShuffleKey| match SignedStages::verify(text, job, key) {
                Err(ClusterError::StagePlan(reason)) => reason,
                other => panic!("not refused: {other:?}"),
            };
        // Another job's key, another job id, a changed byte, a cut, nothing at all.
        assert!(refused(&text, "job-1", &key(8)).contains("MAC does not verify"));
        assert!(refused(&text, "job-2", &key(7)).contains("MAC does not verify"));
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        bytes[40] ^= 1;
        let flipped = URL_SAFE_NO_PAD.encode(&bytes);
        assert!(refused(&flipped, "job-1", &key(7)).contains("MAC does not verify"));
        let mut cut = URL_SAFE_NO_PAD.decode(&text).unwrap();
        cut.truncate(cut.len() - 3);
        assert!(refused(&URL_SAFE_NO_PAD.encode(&cut), "job-1", &key(7)).contains("MAC"));
        assert!(refused("", "job-1", &key(7)).contains("too short"));
        assert!(refused("not base64!", "job-1", &key(7)).contains("base64"));
    }

    #[tokio::test]
    async fn tasks_run_the_signed_stage_restricted_as_the_scheduler_restricted_it() {
        let (ctx, stages, _dir) = planned().await;
        let (stage_one, stage_two) = signed_stages(&ctx, &stages);
        let files = stage_one_files();

        // The scan stage: a task of partitions 1 and 2.
        let received = scheduled(&ctx, &stages[0], &files, &[1, 2]);
        let task = task_plan(1, &stage_one, &received).unwrap();
        assert_eq!(task.partitions, vec![1, 2]);
        assert_eq!(task.map_partitions().to_text(), "1-2");
        assert!(task.readers.is_empty());
        assert_eq!(task.output_partitions(&stage_one), vec![0, 1, 2, 3]);

        // The aggregation stage reads the buckets: a task of buckets 0 and 3.
        let received = scheduled(&ctx, &stages[1], &files, &[0, 3]);
        let task = task_plan(2, &stage_two, &received).unwrap();
        assert_eq!(task.partitions, vec![0, 3]);
        assert_eq!(task.readers.len(), 1);
        let reader = &task.readers[0];
        assert_eq!((reader.stage_id, reader.broadcast), (1, false));
        assert_eq!(reader.partition_ids, vec![0, 3]);
        let held: Vec<(usize, Option<u64>)> = reader.partition[1]
            .iter()
            .map(|l| (l.partition_id.partition_id, l.file_id))
            .collect();
        assert_eq!(held, vec![(3, Some(10)), (3, Some(11))]);
        assert_eq!(task.output_partitions(&stage_two), vec![0, 3]);
    }

    /// Attack 2b: a certificate holder replays a job's settings with plans of its own. Each
    /// task plan that is not a restriction of the signed stage is refused; the signed stage
    /// is what runs, whatever the scheduler's plan says inside its operators.
    #[tokio::test]
    async fn attack_stage_plans_the_driver_did_not_sign_are_refused() {
        let (ctx, stages, _dir) = planned().await;
        let (stage_one, stage_two) = signed_stages(&ctx, &stages);
        let files = stage_one_files();

        // Another query over the same input: another predicate and no aggregation.
        let theirs = stages_of(&ctx, "SELECT a FROM t WHERE a = '2' AND b = 'x'").await;
        let received = scheduled(&ctx, &theirs[0], &HashMap::new(), &[0, 1]);
        let reason = refusal(task_plan(1, &stage_one, &received));
        assert!(
            reason.contains("not stage 1 as the job's driver planned it"),
            "{reason}"
        );

        // The signed stage 2 in place of stage 1, and stage 1's plan for stage 2.
        let received = scheduled(&ctx, &stages[1], &files, &[0]);
        refusal(task_plan(1, &stage_one, &received));
        let received = scheduled(&ctx, &stages[0], &files, &[0]);
        refusal(task_plan(2, &stage_two, &received));

        // Readers' lists holding other buckets than the ones their places stand for: two
        // swapped, or one in place of another.
        let mut swapped = stage_one_files();
        let buckets = swapped.get_mut(&1).unwrap();
        let (zero, three) = (buckets[&0].clone(), buckets[&3].clone());
        buckets.insert(0, three.clone());
        buckets.insert(3, zero);
        let received = scheduled(&ctx, &stages[1], &swapped, &[0, 3]);
        let reason = refusal(task_plan(2, &stage_two, &received));
        assert!(
            reason.contains("partition 3 of stage 1 read in place of partition 0"),
            "{reason}"
        );
        swapped.get_mut(&1).unwrap().insert(0, three);
        let received = scheduled(&ctx, &stages[1], &swapped, &[0, 3]);
        let reason = refusal(task_plan(2, &stage_two, &received));
        assert!(reason.contains("of stage 1"), "{reason}");

        // The same query with another constant: it passes as a restriction (only leaves are
        // compared), and what runs is the signed predicate.
        let theirs = stages_of(&ctx, "SELECT a, count(*) FROM t WHERE b <> 'y' GROUP BY a").await;
        let received = scheduled(&ctx, &theirs[0], &HashMap::new(), &[0]);
        let task = task_plan(1, &stage_one, &received).unwrap();
        let shown = datafusion::physical_plan::displayable(task.plan.as_ref())
            .indent(true)
            .to_string();
        assert!(shown.contains("b@1 != z"), "{shown}");
        assert!(!shown.contains("b@1 != y"), "{shown}");
    }

    /// Attack 10b: the scheduler withholds one map task's file, or hands a reader two tasks'
    /// files for the same map partitions. The reader's cover check refuses both.
    #[tokio::test]
    async fn attack_withheld_or_repeated_map_outputs_are_refused() {
        let (ctx, stages, _dir) = planned().await;
        let (stage_one, stage_two) = signed_stages(&ctx, &stages);
        let feeding = Arc::new(Feeding::of(1, &stage_one).unwrap());

        // Two map tasks, partitions 0-1 and 2-3: complete.
        let coverage = feeding.coverage(vec![2]);
        coverage.record(2, &MapPartitions::new([0, 1])).unwrap();
        coverage.record(2, &MapPartitions::new([2, 3])).unwrap();
        coverage.finish().unwrap();

        // One task's file withheld.
        let coverage = feeding.coverage(vec![2]);
        coverage.record(2, &MapPartitions::new([0, 1])).unwrap();
        let missing = coverage.finish().unwrap_err().to_string();
        assert!(
            missing.contains("map partitions 2-3 are missing"),
            "{missing}"
        );
        // Nothing at all.
        assert!(feeding.coverage(vec![2]).finish().is_err());

        // A rerun of a task listed beside the first run, or an overlapping slice.
        let coverage = feeding.coverage(vec![2]);
        coverage.record(2, &MapPartitions::new([0, 1])).unwrap();
        let twice = coverage.record(2, &MapPartitions::new([1, 2])).unwrap_err();
        assert!(twice.contains("read twice"), "{twice}");
        // A partition the stage does not have, or a file of a partition the reader does not
        // read.
        let coverage = feeding.coverage(vec![2]);
        assert!(
            coverage
                .record(2, &MapPartitions::new([4]))
                .unwrap_err()
                .contains("beyond")
        );
        assert!(coverage.record(1, &MapPartitions::new([0])).is_err());

        // A pass-through stage (the final one): only partition q feeds output q.
        let feeding = Arc::new(Feeding::of(2, &stage_two).unwrap());
        let coverage = feeding.coverage(vec![1]);
        coverage.record(1, &MapPartitions::new([0, 1])).unwrap();
        coverage.finish().unwrap();
        let coverage = feeding.coverage(vec![1]);
        let unrelated = coverage.record(1, &MapPartitions::new([2, 3])).unwrap_err();
        assert!(unrelated.contains("none of which feeds"), "{unrelated}");
    }
}
