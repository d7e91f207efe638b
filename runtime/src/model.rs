//! `Model`: an opened model (a plan, a GGUF file or a Hugging Face directory), immutable and
//! cheap to clone (an `Arc` inside), shared by the engines made from it.

use crate::engine::{Engine, EngineKind, EngineOptions};
use crate::{RuntimeError, Tokenizer, plan};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use wkvc_ir::import::{self, Source};
use wkvc_ir::{Act, ModelConfig, Module};
use wkvc_passes::lower::LoweredPlan;

/// A model ready to run: module, config, tokenizer, provenance. `Clone` shares it.
#[derive(Clone)]
pub struct Model(Arc<ModelData>);

/// What a `Model` holds (reached through `Deref`).
pub struct ModelData {
    pub module: Module,
    pub config: ModelConfig,
    /// How to build the tokenizer (`Model::tokenizer` builds it on first use: running by
    /// token ids never holds its tables).
    pub tokenizer_spec: Option<import::TokenizerSpec>,
    tokenizer: OnceLock<Tokenizer>,
    pub source: Source,
    /// The manifest when the model is a compiled plan.
    pub plan: Option<plan::Manifest>,
    /// the lowered plan per activation mode, built on first use
    lowered: Mutex<HashMap<Act, Arc<LoweredPlan>>>,
}

impl std::ops::Deref for Model {
    type Target = ModelData;
    fn deref(&self) -> &ModelData {
        &self.0
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source.path)
            .field("plan", &self.plan.is_some())
            .finish()
    }
}

impl Model {
    fn new(
        module: Module,
        config: ModelConfig,
        tokenizer_spec: Option<import::TokenizerSpec>,
        source: Source,
        plan: Option<plan::Manifest>,
    ) -> Model {
        Model(Arc::new(ModelData {
            module,
            config,
            tokenizer_spec,
            tokenizer: OnceLock::new(),
            source,
            plan,
            lowered: Mutex::new(HashMap::new()),
        }))
    }

    /// Open a compiled plan, a GGUF file or a Hugging Face directory.
    pub fn open(path: &Path) -> Result<Model, RuntimeError> {
        if path.is_file() && plan::is_plan(path) {
            let (module, mut manifest) = plan::open(path)?;
            // one copy of the spec: the model's
            let tokenizer_spec = manifest.tokenizer.take();
            let mut source = manifest.source.clone();
            source.path = path.to_path_buf();
            source.format = "plan".into();
            source.file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let config = manifest.config.clone();
            return Ok(Model::new(
                module,
                config,
                tokenizer_spec,
                source,
                Some(manifest),
            ));
        }
        let imp = import::import(path)?;
        Ok(Model::new(
            imp.module,
            imp.config,
            imp.tokenizer,
            imp.source,
            None,
        ))
    }

    /// The same model with another module (a compiled variant of this one).
    pub fn with_module(&self, module: Module, plan: Option<plan::Manifest>) -> Model {
        let m = Model::new(
            module,
            self.config.clone(),
            self.tokenizer_spec.clone(),
            self.source.clone(),
            plan,
        );
        if let Some(t) = self.tokenizer.get() {
            let _ = m.tokenizer.set(t.clone());
        }
        m
    }

    /// The tokenizer, built from its spec on first use.
    pub fn tokenizer(&self) -> Result<&Tokenizer, RuntimeError> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let spec = self.tokenizer_spec.as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "{} has no tokenizer (no tokenizer.json / tokenizer metadata)",
                self.source.path.display()
            ))
        })?;
        let t = Tokenizer::from_spec(spec.clone())?;
        Ok(self.tokenizer.get_or_init(|| t))
    }

    /// The activation mode the plan selects for the CPU back end (f32 for a model that is not
    /// a plan, or a plan from before the choice was recorded).
    pub fn plan_act(&self) -> Act {
        self.plan
            .as_ref()
            .and_then(|p| p.lowered.as_ref())
            .map_or(Act::F32, |l| l.act)
    }

    /// The lowered plan for activation mode `act`: the plan file's when it was compiled for
    /// `act` (read back from its text, not lowered again), else lowered here once and kept.
    /// The only place the runtime lowers a graph.
    pub fn lowered(&self, act: Act) -> Result<Arc<LoweredPlan>, RuntimeError> {
        let mut cache = self
            .lowered
            .lock()
            .map_err(|_| RuntimeError::Invalid("lowered plan cache poisoned".into()))?;
        if let Some(p) = cache.get(&act) {
            return Ok(p.clone());
        }
        let max_ctx = self.config.max_position_embeddings;
        let stored = self
            .plan
            .as_ref()
            .and_then(|p| p.lowered.as_ref())
            .filter(|l| l.act == act);
        let p = match stored {
            Some(l) => {
                let g = wkvc_ir::text::parse(&l.graph).map_err(|e| {
                    RuntimeError::Plan(format!("the stored lowered graph does not parse: {e}"))
                })?;
                LoweredPlan::from_lowered(g, &self.module.weights, act, max_ctx)?
            }
            None => LoweredPlan::build(&self.module.graph, &self.module.weights, act, max_ctx)?,
        };
        let p = Arc::new(p);
        cache.insert(act, p.clone());
        Ok(p)
    }

    /// An engine of the given kind on `threads` workers.
    pub fn engine_kind(&self, threads: usize, kind: EngineKind) -> Result<Engine, RuntimeError> {
        Engine::new(
            self,
            kind,
            EngineOptions {
                threads,
                ..Default::default()
            },
        )
    }

    /// An engine with every option.
    pub fn engine_with(
        &self,
        kind: EngineKind,
        opts: EngineOptions,
    ) -> Result<Engine, RuntimeError> {
        Engine::new(self, kind, opts)
    }

    /// The reference interpreter on `threads` workers (`engine_auto` picks the compiled CPU
    /// engine for plans, `engine_kind` chooses explicitly).
    pub fn engine(&self, threads: usize) -> Result<Engine, RuntimeError> {
        self.engine_kind(threads, EngineKind::Interp)
    }

    /// The compiled CPU engine with the plan's activation mode for plans, falling back to the
    /// interpreter with a warning when the plan has something the kernels do not implement;
    /// the interpreter for models that are not plans.
    pub fn engine_auto(&self, threads: usize) -> Result<Engine, RuntimeError> {
        self.engine_auto_with(EngineOptions {
            threads,
            ..Default::default()
        })
    }

    /// `engine_auto` with every option.
    pub fn engine_auto_with(&self, opts: EngineOptions) -> Result<Engine, RuntimeError> {
        if self.plan.is_some() {
            let act = self.plan_act();
            match self.engine_with(EngineKind::Cpu { act }, opts) {
                Ok(e) => return Ok(e),
                Err(e) => {
                    tracing::warn!("compiled CPU engine unavailable, using the interpreter: {e}")
                }
            }
        }
        self.engine_with(EngineKind::Interp, opts)
    }
}
