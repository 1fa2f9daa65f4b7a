# R side of benchmarks/nuts_peers.py: NUTS with Stan (rstan) on the mixture GLMM of
# benchmarks/mixture_glmm.stan, from the same starting points as ours.
#
#   Rscript --vanilla nuts_peers.R MODEL.stan DATA.json INITS.json WARMUP SAMPLES CHAINS CORES SEED DRAWS.csv OUT.csv
#
# DATA.json is the Stan data list, INITS.json a list of one start per chain (both written
# by the Python side). DRAWS.csv gets the post-warm-up draws of every parameter, one row per
# draw with its chain; OUT.csv two columns, name and value: compile_seconds (stan_model),
# sample_seconds (wall time of sampling(), warm-up included), warmup_seconds_max and
# sampling_seconds_max (Stan's own per-chain clocks, the slowest chain), divergences and
# max_treedepth_hits (post-warm-up), mean_leapfrog_steps.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 10) {
  stop("usage: nuts_peers.R MODEL.stan DATA.json INITS.json WARMUP SAMPLES CHAINS CORES SEED DRAWS.csv OUT.csv")
}
# Debian's r-cran-bh leaves the Boost headers in /usr/include, where rstan does not look:
# give it a copy of the package in a temporary library with include/ pointing there.
if (system.file("include", package = "BH") == "" && dir.exists("/usr/include/boost")) {
  library_dir <- file.path(tempdir(), "bh-library")
  dir.create(library_dir)
  file.copy(find.package("BH"), library_dir, recursive = TRUE)
  file.symlink("/usr/include", file.path(library_dir, "BH", "include"))
  .libPaths(c(library_dir, .libPaths()))
}
suppressPackageStartupMessages({
  library(rstan)
  library(jsonlite)
})
data <- fromJSON(args[2], simplifyVector = TRUE)
data$task <- as.integer(data$task)
inits <- fromJSON(args[3], simplifyVector = TRUE, simplifyDataFrame = FALSE, simplifyMatrix = TRUE)
warmup <- as.integer(args[4])
samples <- as.integer(args[5])
chains <- as.integer(args[6])
cores <- as.integer(args[7])
seed <- as.integer(args[8])

compile_seconds <- system.time(model <- stan_model(args[1]))[["elapsed"]]
sample_seconds <- system.time(
  fitted <- sampling(model, data = data, init = inits, chains = chains, cores = cores, iter = warmup + samples,
                     warmup = warmup, seed = seed, refresh = 0)
)[["elapsed"]]

draws <- as.array(fitted)  # [iterations, chains, parameters]
rows <- do.call(rbind, lapply(seq_len(dim(draws)[2]), function(chain) {
  data.frame(chain = chain, draws[, chain, ], check.names = FALSE)
}))
write.csv(rows, args[9], row.names = FALSE)

sampler <- get_sampler_params(fitted, inc_warmup = FALSE)
elapsed <- get_elapsed_time(fitted)
out <- data.frame(
  name = c("compile_seconds", "sample_seconds", "warmup_seconds_max", "sampling_seconds_max", "divergences",
           "max_treedepth_hits", "mean_leapfrog_steps"),
  value = c(compile_seconds, sample_seconds, max(elapsed[, "warmup"]), max(elapsed[, "sample"]),
            sum(sapply(sampler, function(s) sum(s[, "divergent__"]))),
            sum(sapply(sampler, function(s) sum(s[, "treedepth__"] >= 10))),
            mean(sapply(sampler, function(s) mean(s[, "n_leapfrog__"]))))
)
write.csv(out, args[10], row.names = FALSE)
