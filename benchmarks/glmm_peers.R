# R side of benchmarks/glmm_peers.py: fit one case with one peer package and write its
# estimates, log-likelihood and fit time.
#
#   Rscript --vanilla glmm_peers.R CASE PEER DATA.csv OUT.csv REPEATS N_INIT TOL MAX_ITER SEED
#
# DATA.csv has the columns task, x, y, trials, log_exposure; the cases of the paper's
# simulation (paper_*, from benchmarks/peers.py) have task, y and the covariates x1, x2, ...
# OUT.csv gets two columns,
# name and value: the estimates under the Python side's names (w[h, intercept], w[h, x],
# sigma2[h], phi[h] or phi[h, label] / phi[h, label1, label2], pi[h], and u[h, col] the
# concomitant coefficients of flexmix's class h, class 1 the reference), then loglik,
# loglik_kind ("marginal": the log-likelihood at the estimate, Laplace for a GLMM;
# "restricted": the REML criterion, not comparable with ours), converged, iterations and
# components (flexmix; for lme4 the optimiser's function evaluations), and the fit time:
# seconds (median), seconds_min, seconds_max over REPEATS timed calls after one untimed
# warm-up call, each measured by system.time around the fitting call alone.
# Every call starts from set.seed(SEED), so the repeats do the same work.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 9) stop("usage: glmm_peers.R CASE PEER DATA.csv OUT.csv REPEATS N_INIT TOL MAX_ITER SEED")
case <- args[1]
peer <- args[2]
data <- read.csv(args[3], stringsAsFactors = TRUE)
out_path <- args[4]
repeats <- as.integer(args[5])
n_init <- as.integer(args[6])
tol <- as.numeric(args[7])
max_iter <- as.integer(args[8])
seed <- as.integer(args[9])

suppressPackageStartupMessages(library(peer, character.only = TRUE))

# ------------------------------------------------------------------ the model formulas
single_formulas <- list(
  gaussian_intercept = y ~ x + (1 | task),
  gaussian_slope = y ~ x + (1 + x | task),
  bernoulli = y ~ x + (1 | task),
  binomial = cbind(y, trials - y) ~ x + (1 | task),
  poisson = y ~ x + offset(log_exposure) + (1 | task)
)
single_families <- list(gaussian_intercept = "gaussian", gaussian_slope = "gaussian", bernoulli = "binomial",
                        binomial = "binomial", poisson = "poisson")

# The paper's simulation: y on every x* column; membership per row (concomitant multinomial
# on the same columns) without random effects, or per task with a random intercept.
covariates <- grep("^x", names(data), value = TRUE)
paper_rhs <- paste(covariates, collapse = " + ")

fitter <- function() {
  if (peer == "flexmix") {
    control <- list(tol = tol, iter.max = max_iter, verbose = 0)
    if (case == "paper_independence") {
      return(stepFlexmix(as.formula(paste("y ~", paper_rhs)), data = data, k = 2, nrep = n_init, verbose = FALSE,
                         control = control, model = FLXMRglm(family = "gaussian"),
                         concomitant = FLXPmultinom(as.formula(paste("~", paper_rhs)))))
    }
    if (case == "paper_mixture_lmm") {
      return(stepFlexmix(as.formula(paste("y ~", paper_rhs, "| task")), data = data, k = 2, nrep = n_init,
                         verbose = FALSE, control = control, model = FLXMRlmm(random = ~ 1)))
    }
    if (case == "mixture_gaussian") {
      return(stepFlexmix(y ~ x | task, data = data, k = 2, nrep = n_init, verbose = FALSE, control = control,
                         model = FLXMRlmm(random = ~ 1)))
    }
    if (case == "mixture_binomial") {
      return(stepFlexmix(cbind(y, trials - y) ~ x | task, data = data, k = 2, nrep = n_init, verbose = FALSE,
                         control = control, model = FLXMRglm(family = "binomial")))
    }
    if (case == "mixture_poisson") {
      # FLXMRglm takes the offset as an argument; an offset() term in its formula is ignored.
      return(stepFlexmix(y ~ x | task, data = data, k = 2, nrep = n_init, verbose = FALSE, control = control,
                         model = FLXMRglm(family = "poisson", offset = data$log_exposure)))
    }
  }
  formula <- single_formulas[[case]]
  family <- single_families[[case]]
  if (is.null(formula)) stop(sprintf("case %s has no %s model", case, peer))
  if (peer == "lme4") {
    if (family == "gaussian") return(lmer(formula, data = data, REML = TRUE))
    return(glmer(formula, data = data, family = family, nAGQ = 1))
  }
  if (peer == "glmmTMB") return(glmmTMB(formula, data = data, family = family, REML = family == "gaussian"))
  stop(sprintf("unknown peer %s", peer))
}

# ------------------------------------------------------------------ estimates by name
coef_names <- function(h, coef) {
  setNames(unname(coef), sprintf("w[%d, %s]", h, ifelse(names(coef) == "(Intercept)", "intercept", names(coef))))
}

plain <- function(m) matrix(m, nrow(m), dimnames = dimnames(m))  # a covariance without its attributes

phi_names <- function(h, phi) {
  labels <- ifelse(colnames(phi) == "(Intercept)", "intercept", colnames(phi))
  if (nrow(phi) == 1) return(setNames(phi[1, 1], sprintf("phi[%d]", h)))
  out <- setNames(diag(phi), sprintf("phi[%d, %s]", h, labels))
  for (a in 1:(nrow(phi) - 1)) for (b in (a + 1):nrow(phi)) {
    out[sprintf("phi[%d, %s, %s]", h, labels[a], labels[b])] <- phi[a, b]
  }
  out
}

estimates <- function(fit) {
  if (peer == "flexmix") {
    k <- length(fit@components)
    out <- c()
    for (h in 1:k) {
      p <- fit@components[[h]][[1]]@parameters
      out <- c(out, coef_names(h, p$coef))
      if (!is.null(p$sigma2)) {
        out[sprintf("sigma2[%d]", h)] <- p$sigma2$Residual
        out <- c(out, phi_names(h, p$sigma2$Random))
      } else if (!is.null(p$sigma)) {  # FLXMRglm's Gaussian components keep the residual sd
        out[sprintf("sigma2[%d]", h)] <- p$sigma^2
      }
      out[sprintf("pi[%d]", h)] <- prior(fit)[h]
    }
    if (is(fit@concomitant, "FLXPmultinom")) {
      concomitant <- parameters(fit, which = "concomitant")  # [covariate, class], class 1 zero
      for (h in 1:k) {
        names_h <- sprintf("u[%d, %s]", h, ifelse(rownames(concomitant) == "(Intercept)", "intercept",
                                                    rownames(concomitant)))
        out[names_h] <- concomitant[, h]
      }
    }
    return(c(out, components = k, loglik = as.numeric(logLik(fit)), iterations = fit@iter,
             converged = as.numeric(fit@converged)))
  }
  family <- single_families[[case]]
  if (peer == "lme4") {
    out <- c(coef_names(1, fixef(fit)), phi_names(1, plain(VarCorr(fit)$task)))
    if (family == "gaussian") out["sigma2[1]"] <- sigma(fit)^2
    return(c(out, loglik = as.numeric(logLik(fit)), iterations = fit@optinfo$feval,
             converged = as.numeric(length(fit@optinfo$conv$lme4$messages) == 0)))
  }
  out <- c(coef_names(1, fixef(fit)$cond), phi_names(1, plain(VarCorr(fit)$cond$task)))
  if (family == "gaussian") out["sigma2[1]"] <- sigma(fit)^2
  c(out, loglik = as.numeric(logLik(fit)), converged = as.numeric(fit$fit$convergence == 0 && fit$sdr$pdHess))
}

# The Gaussian GLMMs are REML fits: their logLik is the REML criterion. (lme4's
# logLik(REML = FALSE) of a REML fit is not the likelihood at the REML estimates: it
# re-profiles the residual variance.)
loglik_kind <- if (isTRUE(single_families[[case]] == "gaussian")) "restricted" else "marginal"

# ------------------------------------------------------------------ timed fits
set.seed(seed)
fit <- fitter()  # warm-up: loads compiled code, fills caches
seconds <- numeric(repeats)
for (r in seq_len(repeats)) {
  set.seed(seed)
  seconds[r] <- system.time(fit <- fitter())[["elapsed"]]
}
values <- estimates(fit)
rows <- data.frame(name = c(names(values), "loglik_kind", "seconds", "seconds_min", "seconds_max"),
                   value = c(sprintf("%.17g", values), loglik_kind,
                             sprintf("%.17g", c(median(seconds), min(seconds), max(seconds)))))
write.csv(rows, out_path, row.names = FALSE)
