//! The shared job flags resolved into a [`Job`]: defaults, a `--from` file's values and their
//! provenance, explicit flags last.

use super::*;

impl JobSettings {
    /// The `--from` file, parsed.
    pub fn file(&self) -> Result<Option<JobFile>> {
        self.from
            .as_deref()
            .map(|p| memplan::jobfile::load(p).context("--from"))
            .transpose()
    }

    /// The job: built-in defaults, then the file (and the checkpoint's `quantization_config`),
    /// then the flags given. `model_arg` is what names the model (to find its config.json).
    pub fn resolve(
        &self,
        model: memplan::ModelShape,
        model_arg: &str,
        mut file: Option<JobFile>,
        method: Option<&str>,
        batch: Option<u64>,
        seq: Option<u64>,
    ) -> Result<ResolvedJob> {
        use memplan::jobfile::{Provenance, Source};
        let fs = file
            .as_ref()
            .map(|f| f.settings.clone())
            .unwrap_or_default();
        let quant = memplan::hub::config_json_for(model_arg)
            .map(|p| memplan::hub::checkpoint_quant(&p))
            .transpose()?
            .flatten();
        let mut notes: Vec<Provenance> = Vec::new();
        let mut flag = |setting: &'static str, value: String, flag: String| {
            notes.push(Provenance {
                setting,
                value,
                source: Source::Flag(flag),
            })
        };
        let method_flag: Option<Method> = method.map(str::parse).transpose()?;
        let method = match (method_flag, fs.method, &quant) {
            (Some(m), _, _) => m,
            (None, Some(m), _) => m,
            (None, None, Some(CheckpointQuant::Bnb4bit { .. })) => Method::Qlora,
            (None, None, Some(CheckpointQuant::Bnb8bit)) => Method::Lora,
            (None, None, _) => Method::Full,
        };
        if let Some(m) = method_flag {
            flag("method", m.to_string(), format!("--method {m}"));
        }
        let mut job = Job::new(model, method);
        // Checkpointing on for training unless the file or a flag says otherwise (see
        // `--grad-checkpointing`); an inference prefill has no backward to checkpoint for.
        job.grad_checkpointing = method != Method::Inference;
        let mut file_settings = fs.clone();
        if method_flag.is_some_and(|m| Some(m) != fs.method) {
            // The file's precisions belong to its own method.
            file_settings.weights = None;
        }
        memplan::jobfile::apply(&mut job, &file_settings)?;
        match &quant {
            None => {}
            Some(CheckpointQuant::Bnb4bit {
                double_quant,
                compute,
            }) => {
                if method != Method::Qlora {
                    anyhow::bail!("{model_arg} is stored pre-quantized in bitsandbytes 4-bit (config.json quantization_config): it trains only as QLoRA (--method qlora), not {method}");
                }
                job.double_quant = *double_quant;
                if let Some(c) = compute {
                    job.compute = *c;
                }
            }
            Some(CheckpointQuant::Bnb8bit) => {
                if method != Method::Lora {
                    anyhow::bail!("{model_arg} is stored pre-quantized in bitsandbytes 8-bit (config.json quantization_config): it trains only as LoRA on the int8 base (--method lora), not {method}");
                }
                job.weights = memplan::Precision::Int8;
            }
            Some(CheckpointQuant::DequantizedBf16 { quant_method }) => {
                if method == Method::Qlora {
                    // transformers' AutoHfQuantizer.merge_quantization_configs keeps a
                    // pre-quantized checkpoint's own config over one passed at load.
                    anyhow::bail!("{model_arg} is stored in {quant_method} (config.json quantization_config): transformers keeps that config over a BitsAndBytesConfig passed at load, so QLoRA needs a bf16 copy of the checkpoint first; use --method lora (trained dequantized to bf16) or a bf16 checkpoint");
                }
                job.weights = memplan::Precision::Bf16;
            }
        }
        if let Some(w) = &self.weights {
            job.weights = w.parse().context("--weights")?;
            flag("weights", job.weights.to_string(), format!("--weights {w}"));
        }
        job.compute = match &self.compute {
            Some(c) => {
                let c: memplan::Precision = c.parse().context("--compute")?;
                flag("compute", c.to_string(), format!("--compute {c}"));
                c
            }
            None if self.weights.is_none()
                && (fs.compute.is_some()
                    || matches!(
                        &quant,
                        Some(CheckpointQuant::Bnb4bit {
                            compute: Some(_),
                            ..
                        })
                    )) =>
            {
                job.compute
            }
            None if job.weights.is_float() => job.weights,
            None => memplan::Precision::Bf16,
        };
        if let Some(l) = job.lora.as_mut() {
            if let Some(r) = self.rank {
                l.rank = r.into();
                flag("rank", r.to_string(), format!("--rank {r}"));
            }
            if let Some(t) = &self.lora_targets {
                l.targets = parse_targets(t)?;
                flag("lora_targets", t.clone(), format!("--lora-targets {t}"));
            }
            if let Some(d) = self.lora_dropout {
                l.dropout = d;
                flag("lora_dropout", d.to_string(), format!("--lora-dropout {d}"));
            }
        }
        if self.no_double_quant {
            job.double_quant = false;
            flag("double_quant", "false".into(), "--no-double-quant".into());
        } else if self.double_quant {
            job.double_quant = true;
            flag("double_quant", "true".into(), "--double-quant".into());
        }
        if let Some(o) = &self.optimizer {
            job.optimizer = o.parse::<Optimizer>()?;
            flag(
                "optimizer",
                job.optimizer.to_string(),
                format!("--optimizer {o}"),
            );
        }
        if let Some(b) = batch {
            job.batch = b.into();
            flag("batch", b.to_string(), format!("--batch {b}"));
        }
        if let Some(s) = seq {
            job.seq = s.into();
            flag("seq", s.to_string(), format!("--seq {s}"));
        }
        if self.grad_checkpointing {
            job.grad_checkpointing = true;
            flag(
                "grad_checkpointing",
                "true".into(),
                "--grad-checkpointing".into(),
            );
        } else if self.no_grad_checkpointing {
            job.grad_checkpointing = false;
            flag(
                "grad_checkpointing",
                "false".into(),
                "--no-grad-checkpointing".into(),
            );
        }
        if let Some(a) = &self.attention {
            job.attention = a.parse::<Attention>()?;
            flag(
                "attention",
                job.attention.to_string(),
                format!("--attention {a}"),
            );
        }
        if self.kbit_prep {
            job.kbit_prep = true;
            flag("kbit_prep", "true".into(), "--kbit-prep".into());
        }
        if let Some(l) = &self.loss {
            job.loss = l.parse::<Loss>()?;
            flag("loss", job.loss.to_string(), format!("--loss {l}"));
        }
        if let Some(f) = self.supervised_fraction {
            job.supervised_fraction = f;
            flag(
                "supervised_fraction",
                f.to_string(),
                format!("--supervised-fraction {f}"),
            );
        }
        for (on, setting, name, slot) in [
            (self.packing, "packing", "--packing", &mut job.packing),
            (
                self.activation_offload,
                "activation_offload",
                "--activation-offload",
                &mut job.activation_offload,
            ),
            (
                self.liger_kernels,
                "liger_kernels",
                "--liger-kernels",
                &mut job.liger_kernels,
            ),
        ] {
            if on {
                *slot = true;
                flag(setting, "true".into(), name.into());
            }
        }
        if self.quantize_experts {
            job.quantize_experts = true;
            flag(
                "quantize_experts",
                "true".into(),
                "--quantize-experts".into(),
            );
        }
        if self.quantize_after_load {
            job.quantize_after_load = true;
            flag(
                "quantize_after_load",
                "true".into(),
                "--quantize-after-load".into(),
            );
        }
        if let Some(c) = &self.alloc_conf {
            job.alloc_conf = c.parse()?;
            flag("alloc_conf", c.clone(), format!("--alloc-conf {c}"));
        }
        job.validate()?;
        if let Some(f) = file.as_mut() {
            // A flag replaces the file's row for the same setting.
            for n in notes {
                match f.provenance.iter_mut().find(|p| p.setting == n.setting) {
                    Some(row) => *row = n,
                    None => f.provenance.push(n),
                }
            }
            if let Some(q) = &quant {
                f.provenance.push(Provenance {
                    setting: "quantization_config",
                    value: match q {
                        CheckpointQuant::Bnb4bit { .. } => {
                            "bitsandbytes 4-bit (QLoRA on the stored base)".into()
                        }
                        CheckpointQuant::Bnb8bit => {
                            "bitsandbytes 8-bit (LoRA on the int8 base)".into()
                        }
                        CheckpointQuant::DequantizedBf16 { quant_method } => {
                            format!("{quant_method}: not trainable quantized; dequantized to bf16")
                        }
                    },
                    source: Source::ModelConfig(model_arg.to_string()),
                });
            }
        }
        let checkpoint = match memplan::hub::config_json_for(model_arg)
            .as_deref()
            .and_then(std::path::Path::parent)
        {
            Some(dir) if dir.is_dir() => memplan::hub::Checkpoint::read(
                dir,
                job.model.param_counts().total,
                quant.is_some(),
            )?,
            _ => None,
        };
        Ok(ResolvedJob {
            job,
            from: file,
            checkpoint,
        })
    }

    /// One job per model × method (models outer), batch and sequence length as given.
    pub(super) fn jobs(
        &self,
        models: Option<&str>,
        methods: Option<&str>,
        batch: Option<u64>,
        seq: Option<u64>,
    ) -> Result<Vec<Job>> {
        let file = self.file()?;
        let file_model = file.as_ref().and_then(|f| f.settings.model.clone());
        let models = match (models, &file_model) {
            (Some(m), _) => m.to_string(),
            (None, Some(m)) => m.clone(),
            (None, None) => model_arg(None, file.as_ref())?,
        };
        let methods: Vec<Option<&str>> = match methods {
            Some(m) => list("--method", m)?.into_iter().map(Some).collect(),
            None if file.is_some() => vec![None],
            None => vec![Some("full")],
        };
        let mut jobs = Vec::new();
        for m in list("--model", &models)? {
            let (model, _) = resolve_model(m)?;
            for method in &methods {
                let job = self
                    .resolve(model.clone(), m, file.clone(), *method, batch, seq)
                    .with_context(|| {
                        format!(
                            "--model {m} --method {}",
                            method.unwrap_or("(from the file)")
                        )
                    })?
                    .job;
                memplan::chart::values::check_value("--batch", job.batch)?;
                memplan::chart::values::check_value("--seq", job.seq)?;
                jobs.push(job);
            }
        }
        Ok(jobs)
    }
}
