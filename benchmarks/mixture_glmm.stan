// The paper's mixture GLMM with g = 2 Gaussian components (membership per observation),
// a random intercept per task in the mixing logit and in each component's mean, written
// with the priors and the non-centred task effects of mtl_jax's NumPyro program
// (mtl_jax/models/mixture_glmm/program.py): the peer of benchmarks/nuts_peers.py.
// Old array syntax: Debian's rstan 2.21.
data {
  int<lower=1> N;                 // rows
  int<lower=1> K;                 // tasks
  int<lower=1> Q;                 // component covariates, column 1 the intercept
  int<lower=1> QM;                // mixing covariates
  matrix[N, Q] X;
  matrix[N, QM] XM;
  vector[N] y;
  int<lower=1, upper=K> task[N];
  real y_mean;                    // centre of the intercept prior
  real<lower=0> y_sd;             // the response's spread (population sd)
  real<lower=0> coef_scale;       // MixturePriors.coef_scale
  real<lower=0> sd_scale;         // MixturePriors.sd_scale
}
parameters {
  vector[QM] mixing_coef;         // logit of component 1 against component 2
  matrix[Q, 2] component_coef;
  vector<lower=0>[2] component_scale;
  real<lower=0> mixing_effects_sd;
  vector<lower=0>[2] component_effects_sd;
  vector[K] mixing_effects_z;
  matrix[K, 2] component_effects_z;
}
model {
  vector[N] logit_first = XM * mixing_coef + mixing_effects_sd * mixing_effects_z[task];
  matrix[N, 2] mu = X * component_coef;
  vector[N] log_first = log_inv_logit(logit_first);
  vector[N] log_second = log1m_inv_logit(logit_first);
  for (h in 1:2)
    mu[, h] += component_effects_sd[h] * component_effects_z[task, h];

  mixing_coef ~ normal(0, coef_scale);
  component_coef[1] ~ normal(y_mean, coef_scale * y_sd);
  to_vector(component_coef[2:Q]) ~ normal(0, coef_scale * y_sd);
  component_scale ~ cauchy(0, sd_scale * y_sd);
  mixing_effects_sd ~ cauchy(0, sd_scale);
  component_effects_sd ~ cauchy(0, sd_scale * y_sd);
  mixing_effects_z ~ std_normal();
  to_vector(component_effects_z) ~ std_normal();

  for (j in 1:N)
    target += log_sum_exp(log_first[j] + normal_lpdf(y[j] | mu[j, 1], component_scale[1]),
                          log_second[j] + normal_lpdf(y[j] | mu[j, 2], component_scale[2]));
}
