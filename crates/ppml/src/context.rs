//! [`PpmlContext`]: one program's view of ppml — its KMS, its runtime (attested or not), where
//! its queries run, and the encrypted datasets it reads and writes.

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::DataFrame;
use ppml_attestation::Tee;
use ppml_cluster::app::{Placement, encrypted_session};
use ppml_engine::app::{AppReport, AppSpec, Sink};
use ppml_engine::dataset::{Durability, WriteOptions as DatasetWriteOptions};
use ppml_engine::files::{
    DecryptOptions, DecryptOutput, EncryptOptions, EncryptSummary, MediaKind, Progress,
    decrypt_dataset, encrypt_paths,
};
use ppml_engine::receipt::JobDescription;
use ppml_engine::{DatasetLocation, OutputTarget, PpmlSession, WriteSummary};
use ppml_kms::grant::{JobGrant, SignedGrant};
use ppml_kms::{KeyManagementService, KmsError, PrimaryKeyId};

use crate::attest::AttestationConfig;
use crate::config::{GivenSettings, OpenKms, Settings};
use crate::error::{Error, Result};

/// A dataset location given as a path, an `s3://bucket/prefix` URL or a [`DatasetLocation`].
pub trait IntoLocation {
    /// The location; a malformed `s3://` URL is an error.
    fn into_location(self) -> Result<DatasetLocation>;
}

impl IntoLocation for DatasetLocation {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(self)
    }
}

impl IntoLocation for &DatasetLocation {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(self.clone())
    }
}

impl IntoLocation for &str {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(DatasetLocation::parse(self)?)
    }
}

impl IntoLocation for String {
    fn into_location(self) -> Result<DatasetLocation> {
        self.as_str().into_location()
    }
}

impl IntoLocation for &String {
    fn into_location(self) -> Result<DatasetLocation> {
        self.as_str().into_location()
    }
}

impl IntoLocation for &Path {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(DatasetLocation::Local(self.to_path_buf()))
    }
}

impl IntoLocation for std::path::PathBuf {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(DatasetLocation::Local(self))
    }
}

impl IntoLocation for &std::path::PathBuf {
    fn into_location(self) -> Result<DatasetLocation> {
        Ok(DatasetLocation::Local(self.clone()))
    }
}

mod sealed {
    pub trait Sealed {}
}

/// The runtime state of a [`PpmlContext`]: [`Unattested`] or [`Attested`].
pub trait RuntimeState: sealed::Sealed + Send + Sync + 'static {}

/// A context whose process did not attest: keys marked for attested release are refused to
/// it by the KMS.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unattested;

/// A context whose process attested to the KMS server: it can read datasets whose keys are
/// released only to attested runtimes accepted by its policy.
#[derive(Clone, Debug)]
pub struct Attested {
    tee: Tee,
    policy_id: String,
}

impl Attested {
    /// The TEE this process attested in.
    pub fn tee(&self) -> Tee {
        self.tee
    }

    /// The attestation policy it was accepted under.
    pub fn policy_id(&self) -> &str {
        &self.policy_id
    }
}

impl sealed::Sealed for Unattested {}
impl sealed::Sealed for Attested {}
impl RuntimeState for Unattested {}
impl RuntimeState for Attested {}

/// How [`PpmlContext::write`] writes a dataset.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// The format of the parts.
    pub format: OutputFormat,
    /// With [`OutputFormat::Parquet`]: keys of their own for some columns, plaintext footer.
    pub parquet: ppml_engine::pme::PmeOptions,
    /// The primary key of the dataset [default: the context's output key].
    pub key: Option<PrimaryKeyId>,
    /// Part files: the plan's output partitions are merged or split round-robin to this many
    /// [default: as the plan produces].
    pub partitions: Option<usize>,
    /// Replace an existing dataset (only once the new one is complete).
    pub overwrite: bool,
    /// Sync before the dataset appears [default: the context's].
    pub durability: Option<Durability>,
}

/// The formats [`PpmlContext::write`] writes.
pub use ppml_engine::OutputFormat;

/// Builds a [`PpmlContext`]; [`PpmlContextBuilder::attest`] moves it to the [`Attested`]
/// state, whose [`PpmlContextBuilder::build`] attests or fails.
#[derive(Debug)]
pub struct PpmlContextBuilder<S> {
    settings: Option<Settings>,
    kms: Option<OpenKms>,
    primary_key: Option<PrimaryKeyId>,
    output_key: Option<PrimaryKeyId>,
    placement: Placement,
    target_partitions: Option<usize>,
    memory_limit: Option<usize>,
    durability: Durability,
    attestation: Option<AttestationConfig>,
    grant: Option<SignedGrant>,
    state: PhantomData<S>,
}

impl<S> PpmlContextBuilder<S> {
    fn with_state<T>(self) -> PpmlContextBuilder<T> {
        PpmlContextBuilder {
            settings: self.settings,
            kms: self.kms,
            primary_key: self.primary_key,
            output_key: self.output_key,
            placement: self.placement,
            target_partitions: self.target_partitions,
            memory_limit: self.memory_limit,
            durability: self.durability,
            attestation: self.attestation,
            grant: self.grant,
            state: PhantomData,
        }
    }

    /// The KMS settings [default: [`Settings::from_env`], the `PPML_*` variables and the
    /// configuration files, as the `ppml` command reads them].
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// An already opened KMS instead of the settings' (the settings still give `$PPML_HOME`).
    pub fn kms(mut self, kms: OpenKms) -> Self {
        self.kms = Some(kms);
        self
    }

    /// The primary key of new data and of query inputs [default: the settings'].
    pub fn primary_key(mut self, key: impl Into<String>) -> Self {
        self.primary_key = Some(PrimaryKeyId(key.into()));
        self
    }

    /// The primary key results are written under [default: the settings' output key, else
    /// the primary key]. Use a key of the data owner's that is not released to runtimes.
    pub fn output_key(mut self, key: impl Into<String>) -> Self {
        self.output_key = Some(PrimaryKeyId(key.into()));
        self
    }

    /// Where queries run [default: [`Placement::LOCAL`], this process]. With a cluster, this
    /// process is the driver (Ballista client mode) and the executors read and compute.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Parallelism of scans and operators [default: the number of cores].
    pub fn target_partitions(mut self, partitions: usize) -> Self {
        self.target_partitions = Some(partitions);
        self
    }

    /// Memory the query engine may hold in this process; beyond it, operators spill
    /// (encrypted) [default: no limit].
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Whether outputs are synced before they appear [default: [`Durability::Durable`]].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    async fn open(&mut self) -> Result<(Settings, OpenKms)> {
        let mut settings = match self.settings.take() {
            Some(settings) => settings,
            None => Settings::resolve(GivenSettings::from_env())?,
        };
        let mut kms = match self.kms.take() {
            Some(kms) => kms,
            None => settings.open_kms().await?,
        };
        if let Some(key) = self.primary_key.take() {
            kms.primary = Some(key);
        }
        if let Some(key) = self.output_key.take() {
            kms.output = Some(key);
        }
        Ok((settings, kms))
    }

    fn finish<T: RuntimeState>(
        self,
        kms: OpenKms,
        home: &Path,
        state: T,
    ) -> Result<PpmlContext<T>> {
        let placement = match self.placement {
            Placement::Local { partitions, memory } => Placement::Local {
                partitions: self.target_partitions.or(partitions),
                memory: self.memory_limit.or(memory),
            },
            Placement::Cluster(mut cluster) => {
                cluster.target_partitions = self.target_partitions.or(cluster.target_partitions);
                cluster.driver_memory = self.memory_limit.or(cluster.driver_memory);
                Placement::Cluster(cluster)
            }
        };
        let grant = match self.grant {
            Some(signed) => Some(Granted {
                grant: signed.unverified().map_err(KmsError::from)?,
                signed,
            }),
            None => None,
        };
        let input = match &placement {
            Placement::Cluster(_) => Some(kms.primary()?.clone()),
            Placement::Local { .. } => kms.primary.clone(),
        };
        let session = encrypted_session(
            kms.kms(),
            input.as_ref(),
            None,
            &placement,
            grant.as_ref().map(|g| &g.signed),
        )?;
        Ok(PpmlContext {
            kms,
            session,
            grant,
            placement,
            durability: self.durability,
            home: home.to_path_buf(),
            state,
        })
    }
}

impl PpmlContextBuilder<Unattested> {
    /// Attest this process before anything is read: [`PpmlContextBuilder::build`] then
    /// attests to the KMS server in `tee` under the policy `policy_id`, and fails with
    /// [`Error::Attestation`] if the KMS refuses (there is no fallback to an unattested
    /// context).
    pub fn attest(self, tee: Tee, policy_id: impl Into<String>) -> PpmlContextBuilder<Attested> {
        self.attestation(AttestationConfig::new(tee, policy_id))
    }

    /// Like [`PpmlContextBuilder::attest`], with every attestation setting.
    ///
    /// The attested context acts under the job grant given with
    /// [`PpmlContextBuilder::grant`], if any.
    pub fn attestation(mut self, config: AttestationConfig) -> PpmlContextBuilder<Attested> {
        self.attestation = Some(config);
        self.with_state()
    }

    /// Opens the KMS; the context is unattested.
    pub async fn build(mut self) -> Result<PpmlContext<Unattested>> {
        let (settings, kms) = self.open().await?;
        self.finish(kms, &settings.home, Unattested)
    }
}

impl PpmlContextBuilder<Attested> {
    /// Run under the data owner's job grant ([`crate::grant`]): every key request carries
    /// it, so the KMS releases the data keys of the datasets it names (and no others, for
    /// keys marked for attested release), [`PpmlContext::run`] refuses an application the
    /// grant does not name, and [`PpmlContext::write`] an output it does not name.
    pub fn grant(mut self, grant: SignedGrant) -> Self {
        self.grant = Some(grant);
        self
    }

    /// Opens the KMS and attests this process to it; fails with [`Error::Attestation`] when
    /// the KMS refuses the evidence, and with [`Error::Config`] for the embedded KMS, which
    /// cannot verify evidence.
    pub async fn build(mut self) -> Result<PpmlContext<Attested>> {
        let (settings, kms) = self.open().await?;
        let config = self
            .attestation
            .clone()
            .expect("the Attested builder has an attestation configuration");
        let mut kms = kms.attest(&config, &settings.home).await?;
        if let Some(grant) = &self.grant {
            kms = kms.under_grant(grant)?;
        }
        tracing::info!(tee = %config.tee, policy = %config.policy_id, "Attestation Success!");
        let state = Attested {
            tee: config.tee,
            policy_id: config.policy_id,
        };
        self.finish(kms, &settings.home, state)
    }
}

/// A program's ppml context: reads encrypted datasets into DataFusion [`DataFrame`]s, runs
/// SQL, and writes results as encrypted datasets, with keys from the KMS and plans running
/// where its [`Placement`] says. `S` is [`Unattested`] or [`Attested`].
///
/// Every plan it runs holds only the operators a ppml runtime runs
/// ([`ppml_engine::plan_check`]); SQL is queries only (no DDL, DML or `SET`).
pub struct PpmlContext<S: RuntimeState = Unattested> {
    kms: OpenKms,
    session: PpmlSession,
    grant: Option<Granted>,
    placement: Placement,
    durability: Durability,
    home: std::path::PathBuf,
    state: S,
}

/// The job grant a context acts under, as given and as read.
struct Granted {
    signed: SignedGrant,
    grant: JobGrant,
}

impl<S: RuntimeState> std::fmt::Debug for PpmlContext<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PpmlContext")
            .field("kms", &self.kms.kms().kms_id().to_string())
            .field("placement", &self.placement)
            .finish_non_exhaustive()
    }
}

impl PpmlContext<Unattested> {
    /// A builder; `PpmlContext::builder().build().await` is a local, unattested context
    /// with the KMS of the environment's settings.
    pub fn builder() -> PpmlContextBuilder<Unattested> {
        PpmlContextBuilder {
            settings: None,
            kms: None,
            primary_key: None,
            output_key: None,
            placement: Placement::LOCAL,
            target_partitions: None,
            memory_limit: None,
            durability: Durability::default(),
            attestation: None,
            grant: None,
            state: PhantomData,
        }
    }
}

impl PpmlContext<Attested> {
    /// What this process attested as.
    pub fn attestation(&self) -> &Attested {
        &self.state
    }
}

impl<S: RuntimeState> PpmlContext<S> {
    /// The KMS and keys of this context.
    pub fn kms(&self) -> &OpenKms {
        &self.kms
    }

    /// The DataFusion session underneath (its object stores decrypt verified datasets).
    pub fn session(&self) -> &PpmlSession {
        &self.session
    }

    /// The datasets' primary key for new data.
    fn primary(&self) -> Result<&PrimaryKeyId> {
        self.kms.primary()
    }

    /// The encrypted dataset at `location` (a directory or `s3://bucket/prefix`), read as
    /// its manifest's media type says (CSV, NDJSON or Parquet; other media types are refused
    /// with [`ppml_engine::EngineError::UnsupportedMediaType`]). Its manifest and every
    /// part are verified and its data key released by the KMS before this returns; rows are
    /// decrypted as the query streams them.
    pub async fn read(&self, location: impl IntoLocation) -> Result<DataFrame> {
        let (table, _) = self
            .session
            .dataset_table(location.into_location()?, None)
            .await?;
        Ok(self.session.context().read_table(table)?)
    }

    /// The encrypted CSV dataset at `location` ([`PpmlContext::read_as`] CSV: the name
    /// follows BigDL's `read(...).csv(path)`).
    pub async fn read_csv(&self, location: impl IntoLocation) -> Result<DataFrame> {
        self.read_as(location, MediaKind::Csv { header: true })
            .await
    }

    /// The encrypted dataset at `location`, as [`PpmlContext::read`] reads it, once its
    /// manifest says it holds `kind` (CSV with or without header lines alike): a dataset of
    /// another format is refused with [`ppml_engine::EngineError::WrongMediaType`].
    pub async fn read_as(&self, location: impl IntoLocation, kind: MediaKind) -> Result<DataFrame> {
        let (table, dataset) = self
            .session
            .dataset_table(location.into_location()?, None)
            .await?;
        if let Some(dataset) = dataset {
            let media_type = dataset.manifest.media_type();
            let found = MediaKind::from_media_type(media_type);
            if std::mem::discriminant(&found) != std::mem::discriminant(&kind) {
                return Err(ppml_engine::EngineError::WrongMediaType {
                    dataset: dataset.display.clone(),
                    expected: kind.to_string(),
                    media_type: media_type.to_string(),
                }
                .into());
            }
        }
        Ok(self.session.context().read_table(table)?)
    }

    /// A plaintext file or directory, for plaintext-in, encrypted-out programs (BigDL's
    /// `plain_text` mode): Parquet, NDJSON (`.json`, `.jsonl`, `.ndjson`) or, for any other
    /// extension, CSV with a header line. Read in this process only.
    pub async fn read_plaintext(&self, path: impl AsRef<Path>) -> Result<DataFrame> {
        let table = self.session.plaintext_table(path.as_ref(), None).await?;
        Ok(self.session.context().read_table(table)?)
    }

    /// A plaintext file or directory read as `kind` whatever its extension says
    /// ([`PpmlContext::read_plaintext`]); CSV may be without a header line.
    pub async fn read_plaintext_as(
        &self,
        path: impl AsRef<Path>,
        kind: MediaKind,
    ) -> Result<DataFrame> {
        let table = self
            .session
            .plaintext_table_as(path.as_ref(), Some(kind), None)
            .await?;
        Ok(self.session.context().read_table(table)?)
    }

    /// Registers the encrypted dataset at `location` (CSV, NDJSON or Parquet) as the table
    /// `name` for [`PpmlContext::sql`].
    pub async fn register(&self, name: &str, location: impl IntoLocation) -> Result<()> {
        ppml_engine::app::check_table_name(name)?;
        self.session
            .register_dataset(name, location.into_location()?, None)
            .await?;
        Ok(())
    }

    /// Registers a plaintext file or directory as the table `name` (formats as
    /// [`PpmlContext::read_plaintext`]).
    pub async fn register_plaintext(&self, name: &str, path: impl AsRef<Path>) -> Result<()> {
        ppml_engine::app::check_table_name(name)?;
        let table = self.session.plaintext_table(path.as_ref(), None).await?;
        self.session.context().register_table(name, table)?;
        Ok(())
    }

    /// Registers the rows of `df` (a query of this context's) as the view `name` for
    /// [`PpmlContext::sql`], replacing a table or view of that name: Spark's
    /// `createOrReplaceTempView`. The view is planned into each query that names it.
    pub fn register_view(&self, name: &str, df: DataFrame) -> Result<()> {
        ppml_engine::app::check_table_name(name)?;
        self.session
            .context()
            .register_table(name, df.into_view())?;
        Ok(())
    }

    /// Plans a query over the registered tables (queries only: DDL, DML and `SET` are
    /// refused).
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        Ok(self.session.sql(sql).await?)
    }

    /// Runs `df` where this context's placement says and collects its rows in memory (for
    /// small results: they are plaintext in this process).
    pub async fn collect(&self, df: DataFrame) -> Result<Vec<RecordBatch>> {
        Ok(self.session.collect(df).await?)
    }

    /// Runs `df` where this context's placement says and returns its rows as they come (the
    /// output partitions read concurrently): for results of any size, held in memory one
    /// batch at a time.
    pub async fn stream(&self, df: DataFrame) -> Result<SendableRecordBatchStream> {
        Ok(self.session.stream(df).await?)
    }

    /// Runs `df` and writes its rows as a new encrypted dataset at `location`, under a fresh
    /// data key wrapped under `options.key` (default: the output key). Parts are written in
    /// parallel; the dataset appears only when every part is complete.
    pub async fn write(
        &self,
        df: DataFrame,
        location: impl IntoLocation,
        options: WriteOptions,
    ) -> Result<WriteSummary> {
        let kms = self.kms.kms();
        // The plan as the program built it: operators, tables and the constants in its
        // expressions, never a row.
        let mut job = JobDescription::new(
            "dataframe",
            serde_json::json!({"plan": df.logical_plan().display_indent().to_string()}),
        );
        job.grant = self.grant_record();
        let target = self.output_target(kms.as_ref(), location, &options, job)?;
        Ok(self
            .session
            .write(df, target, options.partitions, options.format)
            .await?)
    }

    /// Writes rows this application holds (an Arrow stream it made, not a query) as a new
    /// encrypted dataset at `location`, as [`PpmlContext::write`] does; `options.partitions`
    /// deals the stream's batches to that many parts in turn. The rows are not a plan, so
    /// they run through no operator check and no placement: they are encrypted in this
    /// process as they stream.
    pub async fn write_stream(
        &self,
        stream: SendableRecordBatchStream,
        location: impl IntoLocation,
        options: WriteOptions,
    ) -> Result<WriteSummary> {
        let kms = self.kms.kms();
        let mut job = JobDescription::new("stream", serde_json::json!({}));
        job.grant = self.grant_record();
        let target = self.output_target(kms.as_ref(), location, &options, job)?;
        let schema = stream.schema();
        let parts = options.partitions.unwrap_or(1);
        let streams = ppml_engine::session::split_round_robin(stream, parts);
        Ok(ppml_engine::session::write_streams(streams, schema, target, options.format).await?)
    }

    /// The owner's grant this context runs under, as job receipts name it.
    fn grant_record(&self) -> Option<ppml_kms::GrantRecord> {
        self.grant
            .as_ref()
            .map(|g| ppml_kms::GrantRecord::new(&g.grant, g.signed.sha256_hex()))
    }

    /// Where [`PpmlContext::write`] and [`PpmlContext::write_stream`] write, after the checks
    /// of the owner's grant, if any.
    fn output_target<'a>(
        &'a self,
        kms: &'a dyn KeyManagementService,
        location: impl IntoLocation,
        options: &'a WriteOptions,
        job: JobDescription,
    ) -> Result<OutputTarget<'a>> {
        let primary = match &options.key {
            Some(key) => key,
            None => self.kms.output_primary()?,
        };
        let dir = location.into_location()?;
        if let Some(granted) = &self.grant {
            ppml_engine::app::check_granted_output(
                &granted.grant,
                &dir,
                primary,
                options.overwrite,
            )?;
        }
        Ok(OutputTarget::Encrypted {
            kms,
            primary,
            dir,
            options: DatasetWriteOptions {
                overwrite: options.overwrite,
                durability: options.durability.unwrap_or(self.durability),
                parquet: options.parquet.clone(),
                job: Some(job),
                ..DatasetWriteOptions::default()
            },
        })
    }

    /// Encrypts the file or directory `input` into a new dataset at `destination`, under
    /// the primary key (see [`ppml_engine::files::encrypt_paths`]).
    pub async fn encrypt_paths(
        &self,
        input: impl AsRef<Path>,
        destination: impl IntoLocation,
        options: &EncryptOptions,
        progress: &dyn Progress,
    ) -> Result<EncryptSummary> {
        let kms = self.kms.kms();
        Ok(encrypt_paths(
            kms.as_ref(),
            self.primary()?,
            input.as_ref(),
            destination.into_location()?,
            options,
            progress,
        )
        .await?)
    }

    /// Verifies the dataset at `location` and writes its plaintext to `output` (see
    /// [`ppml_engine::files::decrypt_dataset`]); returns its plaintext bytes.
    pub async fn decrypt_dataset(
        &self,
        location: impl IntoLocation,
        output: DecryptOutput<'_>,
        options: &DecryptOptions,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let kms = self.kms.kms();
        let location = location.into_location()?;
        Ok(decrypt_dataset(kms.as_ref(), &location, output, options, progress).await?)
    }

    /// Runs an application by name (SimpleQuery, SQL) where this context's placement says,
    /// writing under the output key.
    pub async fn run(&self, spec: &AppSpec) -> Result<AppReport> {
        if spec.is_plaintext() {
            return Err(Error::Config {
                what: spec.summary(),
                reason: "a context runs encrypted applications; plaintext runs go through \
                         ppml_cluster::app::run_app without keys"
                    .into(),
            });
        }
        let partitions = spec.input_partitions();
        let fresh;
        let session = if partitions.is_some() {
            let input = match &self.placement {
                Placement::Cluster(_) => Some(self.kms.primary()?.clone()),
                Placement::Local { .. } => self.kms.primary.clone(),
            };
            fresh = encrypted_session(
                self.kms.kms(),
                input.as_ref(),
                partitions,
                &self.placement,
                self.grant.as_ref().map(|g| &g.signed),
            )?;
            &fresh
        } else {
            &self.session
        };
        if let Some(granted) = &self.grant {
            spec.check_grant(&granted.grant, self.kms.output_primary()?)?;
        }
        let kms = self.kms.kms();
        let grant = self.grant_record();
        let sink = Sink::Encrypted {
            kms: kms.as_ref(),
            primary: self.kms.output_primary()?,
            durability: self.durability,
            grant: grant.as_ref(),
        };
        Ok(spec.run(session, sink).await?)
    }

    /// `$PPML_HOME` of this context's settings.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The KMS client as the key interface the engine uses.
    pub fn key_service(&self) -> Arc<dyn KeyManagementService> {
        self.kms.kms()
    }
}
