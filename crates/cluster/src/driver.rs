//! Cluster mode (docs/cluster.md §4): the driver runs as a task on an attested executor.
//!
//! `ppml submit --mode cluster` holds no key and sees no row: it submits a one-node plan,
//! [`PpmlDriverExec`], whose only content is the application's description ([`DriverSpec`]).
//! The scheduler runs it as a job of one task; the executor that takes the task recognises
//! the node (see [`crate::engine`]) and hands the spec to its [`JobDriver`] (by default an
//! [`AppDriver`]), which plans the application with the executor's attested KMS client, runs
//! it as further jobs on the cluster (a [`crate::ClusterRunner`]) and writes the encrypted
//! output to storage. Progress goes to the scheduler's job log ([`crate::jobs`]).
//!
//! The node travels through [`PpmlPhysicalCodec`], which wraps Ballista's codec and is
//! installed in the scheduler, the executors and the submitting client. ppml nodes are encoded
//! as `0x00 "PPML" 0x01` followed by JSON; a protobuf message cannot start with a 0x00 byte
//! (field number 0), so the two encodings cannot be confused.

use std::fmt;
use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use datafusion::arrow::datatypes::Schema;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion_proto::physical_plan::{
    AsExecutionPlan, PhysicalExtensionCodec, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::PhysicalPlanNode;
use ppml_engine::app::{AppReport, AppSpec};
use ppml_engine::dataset::Durability;
use ppml_kms::grant::SignedGrant;
use ppml_kms::{KeyManagementService, PrimaryKeyId};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::app::{AppKeys, ClusterPlacement, Placement, run_app};
use crate::flight::EndpointCustomizer;
use crate::jobs::DriverLog;

/// First bytes of every ppml plan node in a serialized plan.
const NODE_MAGIC: &[u8] = b"\0PPML\x01";
/// Version of the driver node's encoding.
const DRIVER_NODE_VERSION: u32 = 2;

/// What a cluster-mode job runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverSpec {
    /// The application; its paths are absolute or URLs (they are opened on the executors).
    pub app: AppSpec,
    /// One line for logs and plan displays: the application's kind and output, no values.
    pub summary: String,
    /// The input key, under which the job's shuffle keys are wrapped [default: the
    /// executor's primary key].
    #[serde(default)]
    pub input_key: Option<String>,
    /// The key of the output [default: the executor's output key, else its primary key].
    #[serde(default)]
    pub output_key: Option<String>,
    /// Partitions the plans are cut into [default: the driver session's].
    #[serde(default)]
    pub target_partitions: Option<usize>,
    /// `datafusion.*` / `ballista.*` settings.
    #[serde(default)]
    pub conf: Vec<(String, String)>,
    /// Memory limit of the driver's query engine, in bytes.
    #[serde(default)]
    pub driver_memory: Option<usize>,
    /// The data owner's grant of the job. The driver refuses an application, output, output
    /// key or overwrite the grant does not name, and every key request of the job carries it
    /// (the KMS releases the data keys of marked keys only under a grant that names them).
    #[serde(default)]
    pub grant: Option<SignedGrant>,
}

impl DriverSpec {
    /// A job running `app` (its paths made absolute) with the executor's defaults.
    pub fn new(app: &AppSpec) -> Result<Self, ClusterError> {
        let app = app.with_absolute_paths()?;
        Ok(DriverSpec {
            summary: app.summary(),
            app,
            input_key: None,
            output_key: None,
            target_partitions: None,
            conf: Vec::new(),
            driver_memory: None,
            grant: None,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "node", deny_unknown_fields)]
enum PpmlNode {
    #[serde(rename = "driver")]
    Driver { v: u32, spec: DriverSpec },
}

/// The plan of a cluster-mode job: one partition, no input, no output rows. It is never
/// executed as an operator: the executor's engine runs its spec with a [`JobDriver`].
#[derive(Debug)]
pub struct PpmlDriverExec {
    spec: DriverSpec,
    properties: Arc<PlanProperties>,
}

impl PpmlDriverExec {
    /// The plan of a job running `spec`.
    pub fn new(spec: DriverSpec) -> Self {
        let schema = Arc::new(Schema::empty());
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        PpmlDriverExec {
            spec,
            properties: Arc::new(properties),
        }
    }

    /// The application this job runs.
    pub fn spec(&self) -> &DriverSpec {
        &self.spec
    }
}

impl DisplayAs for PpmlDriverExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PpmlDriverExec: {}", self.spec.summary)
    }
}

impl ExecutionPlan for PpmlDriverExec {
    fn name(&self) -> &str {
        "PpmlDriverExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "PpmlDriverExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        Err(DataFusionError::Execution(
            "a ppml driver task runs only as the whole stage of a ppml executor".into(),
        ))
    }
}

/// What a driver task gets from the executor it runs on.
pub struct DriverContext {
    /// The scheduler, `host:port`, for the application's jobs.
    pub master: String,
    /// The executor's attested KMS client.
    pub kms: Arc<dyn KeyManagementService>,
    /// TLS of the executor's outgoing channels (None = cleartext, development only).
    pub customizer: EndpointCustomizer,
    /// The job's log (this process's log and the scheduler's job log).
    pub log: DriverLog,
}

impl fmt::Debug for DriverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverContext")
            .field("master", &self.master)
            .field("job", &self.log.job_id())
            .finish_non_exhaustive()
    }
}

/// Runs the applications of cluster-mode jobs on an executor.
#[async_trait::async_trait]
pub trait JobDriver: Send + Sync + fmt::Debug {
    /// Runs `spec` to completion: plans it, runs its jobs on the cluster, writes and commits
    /// its encrypted output. Errors leave the executor redacted ([`crate::redact`]).
    async fn run(&self, spec: &DriverSpec, context: DriverContext) -> Result<(), ClusterError>;
}

/// The executor's [`JobDriver`]: runs the job's [`AppSpec`] with the executor's attested KMS
/// client, on the cluster, exactly as a client-mode driver would.
#[derive(Clone, Debug, Default)]
pub struct AppDriver {
    /// The input key of jobs that name none.
    pub input_key: Option<PrimaryKeyId>,
    /// The output key of jobs that name none (else the input key).
    pub output_key: Option<PrimaryKeyId>,
    /// Whether outputs are synced before they appear.
    pub durability: Durability,
}

#[async_trait::async_trait]
impl JobDriver for AppDriver {
    async fn run(&self, spec: &DriverSpec, context: DriverContext) -> Result<(), ClusterError> {
        if spec.app.is_plaintext() {
            return Err(ClusterError::Setup(
                "plaintext applications run only in local mode".into(),
            ));
        }
        let input = spec
            .input_key
            .clone()
            .map(PrimaryKeyId)
            .or_else(|| self.input_key.clone());
        let output = spec
            .output_key
            .clone()
            .map(PrimaryKeyId)
            .or_else(|| self.output_key.clone())
            .or_else(|| input.clone())
            .ok_or_else(|| {
                ClusterError::Setup(
                    "no output key: the job names none and the executor has no primary key".into(),
                )
            })?;
        let keys = AppKeys {
            kms: context.kms.clone(),
            input,
            output,
            grant: spec.grant.clone(),
        };
        let log = context.log.clone();
        let placement = Placement::Cluster(Box::new(ClusterPlacement {
            master: context.master.clone(),
            target_partitions: spec.target_partitions,
            conf: spec.conf.clone(),
            customizer: context.customizer.clone(),
            driver_memory: spec.driver_memory,
            log: Some(log.clone()),
        }));
        let report = run_app(&spec.app, Some(&keys), &placement, self.durability).await?;
        // Row counts leave the TEE (the job log is the scheduler's) only if the job's grant
        // allows (`run_app` refused a grant that does not parse).
        let reveal_counts = spec
            .grant
            .as_ref()
            .is_none_or(|g| g.unverified().is_ok_and(|g| g.reveal_counts));
        if let AppReport::SimpleQuery(report) = &report {
            for (phase, duration) in &report.timings {
                log.line(format!("{phase} time: {:.3} s", duration.as_secs_f64()))
                    .await;
            }
        }
        let output = spec.app.output().map(|o| o.to_string()).unwrap_or_default();
        let line = match &report {
            _ if !reveal_counts => format!("wrote {output}"),
            AppReport::SimpleQuery(report) => format!(
                "wrote {} rows in {} part(s) to {output}",
                report.output.rows, report.output.parts
            ),
            other => format!("wrote {} rows to {output}", other.rows()),
        };
        log.line(line).await;
        Ok(())
    }
}

/// Encodes a physical plan with [`PpmlPhysicalCodec`], as it goes to the scheduler. A plan
/// the codec cannot carry (an operator Ballista has no encoding for) is a
/// [`ClusterError::Plan`] naming the operator, without DataFusion's dump of the whole plan.
pub fn encode_plan(plan: &Arc<dyn ExecutionPlan>) -> std::result::Result<Vec<u8>, ClusterError> {
    let codec = PpmlPhysicalCodec::default();
    let node = PhysicalPlanNode::try_from_physical_plan(plan.clone(), &codec).map_err(|e| {
        // DataFusion appends the whole plan's debug dump; the operator's name says enough.
        let message = e.to_string();
        let message = message.split(". Plan: ").next().unwrap_or(&message);
        ClusterError::Plan(format!("{message} (this query cannot run on a cluster)"))
    })?;
    Ok(node.encode_to_vec())
}

/// Decodes a physical plan encoded with [`PpmlPhysicalCodec`] (a plan as the scheduler
/// receives it, a stage plan, or a task's plan as the scheduler sends it).
pub fn decode_plan(
    bytes: &[u8],
    ctx: &TaskContext,
) -> std::result::Result<Arc<dyn ExecutionPlan>, ClusterError> {
    let codec = PpmlPhysicalCodec::default();
    let node = PhysicalPlanNode::decode(bytes).map_err(|e| ClusterError::Plan(e.to_string()))?;
    // Through the converter from the root down: DataFusion's own entry point would decode
    // the root node without it.
    let decode_ctx = datafusion_proto::physical_plan::PhysicalPlanDecodeContext::new(ctx, &codec);
    GuardedConverter
        .proto_to_execution_plan(&node, &decode_ctx)
        .map_err(|e| ClusterError::Plan(e.to_string()))
}

/// DataFusion's proto converter, refusing the plan nodes whose decoding panics instead of
/// failing (each found by the `cluster_plan` fuzz target): an Avro scan (datafusion-proto
/// panics when its `avro` feature is off), an `EXPLAIN` node (a stringified plan without its
/// type), an unnest whose recursion misses a column. Every node of the plan passes through it.
struct GuardedConverter;

impl GuardedConverter {
    /// Why `node` cannot be decoded without a panic, if it cannot.
    fn refusal(node: &PhysicalPlanNode) -> Option<&'static str> {
        use datafusion_proto::protobuf::physical_plan_node::PhysicalPlanType;
        match node.physical_plan_type.as_ref()? {
            PhysicalPlanType::AvroScan(_) => Some("Avro scans are not part of ppml plans"),
            PhysicalPlanType::Explain(_) => Some("EXPLAIN is not part of ppml plans"),
            PhysicalPlanType::Unnest(unnest) => unnest
                .options
                .iter()
                .flat_map(|options| &options.recursions)
                .any(|r| r.input_column.is_none() || r.output_column.is_none())
                .then_some("an unnest recursion without its columns"),
            _ => None,
        }
    }
}

impl PhysicalProtoConverterExtension for GuardedConverter {
    fn proto_to_execution_plan(
        &self,
        proto: &PhysicalPlanNode,
        ctx: &datafusion_proto::physical_plan::PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        use datafusion_proto::physical_plan::PhysicalPlanNodeExt as _;
        if let Some(reason) = Self::refusal(proto) {
            return Err(DataFusionError::NotImplemented(reason.into()));
        }
        proto.try_into_physical_plan_with_context(ctx, self)
    }

    // Encoding is DataFusion's: this converter only decodes.
    fn execution_plan_to_proto(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<PhysicalPlanNode> {
        datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {}
            .execution_plan_to_proto(plan, codec)
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<datafusion_proto::protobuf::PhysicalExprNode> {
        datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {}
            .physical_expr_to_proto(expr, codec)
    }

    fn proto_to_physical_expr(
        &self,
        proto: &datafusion_proto::protobuf::PhysicalExprNode,
        input_schema: &Schema,
        ctx: &datafusion_proto::physical_plan::PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        datafusion_proto::physical_plan::from_proto::parse_physical_expr_with_converter(
            proto,
            input_schema,
            ctx,
            self,
        )
    }
}

/// Refuses a Ballista shuffle writer node that does not have exactly one input: Ballista's
/// codec takes its input as `inputs[0]` unchecked, so a plan from a hostile scheduler without
/// one would panic the executor's decoding (found by the `cluster_plan` fuzz target). Its
/// other nodes check their inputs themselves.
fn check_ballista_inputs(buf: &[u8], inputs: &[Arc<dyn ExecutionPlan>]) -> Result<()> {
    use ballista_core::serde::protobuf::BallistaPhysicalPlanNode;
    use ballista_core::serde::protobuf::ballista_physical_plan_node::PhysicalPlanType;
    use prost::Message as _;
    // Undecodable bytes are left to Ballista's codec, which refuses them with its own error.
    let Ok(node) = BallistaPhysicalPlanNode::decode(buf) else {
        return Ok(());
    };
    let writer = match node.physical_plan_type {
        Some(PhysicalPlanType::ShuffleWriter(_)) => "ShuffleWriterExec",
        Some(PhysicalPlanType::RangeShuffleWriter(_)) => "RangeShuffleWriterExec",
        Some(PhysicalPlanType::SortShuffleWriter(_)) => "SortShuffleWriterExec",
        _ => return Ok(()),
    };
    if inputs.len() != 1 {
        return Err(DataFusionError::Internal(format!(
            "{writer} with {} inputs (it takes exactly one)",
            inputs.len()
        )));
    }
    Ok(())
}

/// ppml's physical plan codec: ppml's nodes, and Ballista's for everything else.
#[derive(Debug, Default)]
pub struct PpmlPhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
}

impl PpmlPhysicalCodec {
    /// The codec, as an `Arc` for Ballista's configurations.
    pub fn shared() -> Arc<dyn PhysicalExtensionCodec> {
        Arc::new(PpmlPhysicalCodec::default())
    }
}

impl PhysicalExtensionCodec for PpmlPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(json) = buf.strip_prefix(NODE_MAGIC) else {
            check_ballista_inputs(buf, inputs)?;
            return self.inner.try_decode(buf, inputs, ctx, proto_converter);
        };
        let node: PpmlNode = serde_json::from_slice(json)
            .map_err(|e| DataFusionError::Internal(format!("ppml plan node: {e}")))?;
        match node {
            PpmlNode::Driver { v, spec } => {
                if v != DRIVER_NODE_VERSION {
                    return Err(DataFusionError::Internal(format!(
                        "ppml driver node version {v} (this build reads {DRIVER_NODE_VERSION})"
                    )));
                }
                if !inputs.is_empty() {
                    return Err(DataFusionError::Internal(
                        "ppml driver node with inputs".into(),
                    ));
                }
                Ok(Arc::new(PpmlDriverExec::new(spec)))
            }
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(driver) = node.downcast_ref::<PpmlDriverExec>() else {
            return self.inner.try_encode(node, buf, proto_converter);
        };
        buf.extend_from_slice(NODE_MAGIC);
        serde_json::to_writer(
            &mut *buf,
            &PpmlNode::Driver {
                v: DRIVER_NODE_VERSION,
                spec: driver.spec.clone(),
            },
        )
        .map_err(|e| DataFusionError::Internal(format!("ppml plan node: {e}")))
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.inner.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

#[cfg(test)]
mod tests {
    use datafusion_proto::physical_plan::AsExecutionPlan;
    use datafusion_proto::protobuf::PhysicalPlanNode;
    use prost::Message;

    use super::*;

    /// Plan nodes whose decoding panics in DataFusion are refused with an error first.
    #[test]
    fn nodes_that_would_panic_the_decoder_are_refused() {
        use datafusion_proto::protobuf::physical_plan_node::PhysicalPlanType;
        use datafusion_proto::protobuf::{
            EmptyExecNode, ExplainExecNode, RecursionUnnestOption, StringifiedPlan, UnnestExecNode,
            UnnestOptions,
        };
        let ctx = datafusion::prelude::SessionContext::new();
        let schema = Schema::new(vec![datafusion::arrow::datatypes::Field::new(
            "a",
            datafusion::arrow::datatypes::DataType::Int64,
            true,
        )]);
        let schema: datafusion_proto::protobuf::Schema = (&schema).try_into().unwrap();
        let empty = PhysicalPlanNode {
            physical_plan_type: Some(PhysicalPlanType::Empty(EmptyExecNode {
                schema: Some(schema.clone()),
                partitions: 1,
            })),
        };
        let unnest = PhysicalPlanNode {
            physical_plan_type: Some(PhysicalPlanType::Unnest(Box::new(UnnestExecNode {
                input: Some(Box::new(empty)),
                schema: Some(schema.clone()),
                list_type_columns: vec![],
                struct_type_columns: vec![],
                options: Some(UnnestOptions {
                    recursions: vec![RecursionUnnestOption {
                        output_column: None,
                        input_column: None,
                        depth: 1,
                    }],
                    ..Default::default()
                }),
            }))),
        };
        let explain = PhysicalPlanNode {
            physical_plan_type: Some(PhysicalPlanType::Explain(ExplainExecNode {
                schema: Some(schema),
                stringified_plans: vec![StringifiedPlan {
                    plan_type: None,
                    plan: String::new(),
                }],
                verbose: false,
            })),
        };
        for (node, reason) in [(unnest, "unnest recursion"), (explain, "EXPLAIN")] {
            let refused = decode_plan(&node.encode_to_vec(), &ctx.task_ctx()).unwrap_err();
            assert!(refused.to_string().contains(reason), "{refused}");
        }
    }

    fn spec() -> DriverSpec {
        DriverSpec::new(&AppSpec::SimpleQuery(ppml_engine::app::SimpleQuerySpec {
            input: "/in".parse().unwrap(),
            output: "/out".parse().unwrap(),
            input_partitions: None,
            output_partitions: None,
            overwrite: false,
            plaintext: false,
            no_preview: true,
        }))
        .unwrap()
    }

    fn round_trip(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        let codec = PpmlPhysicalCodec::default();
        let bytes = PhysicalPlanNode::try_from_physical_plan(plan, &codec)?.encode_to_vec();
        let node = PhysicalPlanNode::decode(bytes.as_slice())
            .map_err(|e| DataFusionError::Internal(e.to_string()))?;
        let ctx = datafusion::prelude::SessionContext::new();
        node.try_into_physical_plan(&ctx.task_ctx(), &codec)
    }

    #[test]
    fn driver_nodes_round_trip_through_the_codec() {
        let decoded = round_trip(Arc::new(PpmlDriverExec::new(spec()))).unwrap();
        let driver = decoded.downcast_ref::<PpmlDriverExec>().unwrap();
        assert_eq!(driver.spec(), &spec());
        // Under Ballista's shuffle writer, as the scheduler sends it to an executor.
        let writer = ballista_core::execution_plans::ShuffleWriterExec::try_new(
            "job1".into(),
            1,
            Arc::new(PpmlDriverExec::new(spec())),
            "/work".into(),
        )
        .unwrap();
        let decoded = round_trip(Arc::new(writer)).unwrap();
        assert!(decoded.children()[0].is::<PpmlDriverExec>());
    }

    #[test]
    fn unknown_versions_and_fields_are_refused() {
        let codec = PpmlPhysicalCodec::default();
        let ctx = datafusion::prelude::SessionContext::new();
        let converter = datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {};
        for json in [
            r#"{"node":"driver","v":1,"spec":{"app":{"sql":{"sql":"","tables":{}}},"summary":""}}"#,
            r#"{"node":"driver","v":2,"spec":{"app":{"sql":{"sql":"","tables":{}}},"summary":"","extra":1}}"#,
            r#"{"node":"driver","v":2,"spec":{"app":{"copy":{}},"summary":""}}"#,
            r#"{"node":"sink","v":1}"#,
        ] {
            let mut buf = NODE_MAGIC.to_vec();
            buf.extend_from_slice(json.as_bytes());
            assert!(
                codec
                    .try_decode(&buf, &[], &ctx.task_ctx(), &converter)
                    .is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn driver_nodes_do_not_run_as_operators() {
        let ctx = datafusion::prelude::SessionContext::new();
        let error = PpmlDriverExec::new(spec())
            .execute(0, ctx.task_ctx())
            .err()
            .unwrap();
        assert!(error.to_string().contains("driver task"), "{error}");
    }
}
