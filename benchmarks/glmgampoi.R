# Reference NB GLM fit with glmGamPoi, for benchmarks/compare_glmgampoi.py.
#
# Usage: Rscript benchmarks/glmgampoi.R IN_DIR OUT_DIR DESIGN_COLUMN REFERENCE_LEVEL
# Needs: apt-get install -y r-bioc-glmgampoi (glmGamPoi 1.10.2 on R 4.2; brings Matrix, for readMM)
#
# IN_DIR holds
#   counts.mtx  MatrixMarket counts, genes x cells (glmGamPoi's orientation, so no transpose here)
#   cells.tsv   one row per column of counts.mtx: cell, size_factor, and the design column(s)
#   genes.tsv   one row per row of counts.mtx: gene
# OUT_DIR receives
#   coefficients.tsv    gene, Intercept, DESIGN_COLUMN[level] for each non-reference level:
#                       glmGamPoi's Beta, natural-log scale
#   overdispersions.tsv gene, overdispersion (theta: Var = mu + theta mu^2, i.e. 1/alpha of scnbvi)
#   timing.json         seconds of the glm_gp call alone and of the whole script
#
# The model is mu_gc = size_factor_c * exp(x_c' beta_g); with size_factor = total count / 1e5 the
# log offset equals scnbvi's log(s_i / s_ref).

started <- proc.time()[["elapsed"]]
args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 4) {
  stop("usage: Rscript glmgampoi.R IN_DIR OUT_DIR DESIGN_COLUMN REFERENCE_LEVEL", call. = FALSE)
}
in_dir <- args[[1]]
out_dir <- args[[2]]
column <- args[[3]]
reference <- args[[4]]

suppressPackageStartupMessages({
  library(Matrix)
  library(glmGamPoi)
})

cells <- read.delim(file.path(in_dir, "cells.tsv"), check.names = FALSE, colClasses = c(cell = "character"))
genes <- read.delim(file.path(in_dir, "genes.tsv"), check.names = FALSE, colClasses = "character")
Y <- as(readMM(file.path(in_dir, "counts.mtx")), "CsparseMatrix")
stopifnot(nrow(Y) == nrow(genes), ncol(Y) == nrow(cells), column %in% names(cells))
dimnames(Y) <- list(genes$gene, cells$cell)

# The reference level first, so that the intercept is the reference and every other
# coefficient is a log fold change against it; only levels present in the cells.
values <- as.character(cells[[column]])
if (!reference %in% values) {
  stop(sprintf("reference level '%s' is not a value of column '%s' (values: %s)", reference, column,
               paste(sort(unique(values)), collapse = ", ")), call. = FALSE)
}
levels <- c(reference, sort(setdiff(unique(values), reference)))
cells[[column]] <- factor(values, levels = levels)

fit_started <- proc.time()[["elapsed"]]
fit <- glm_gp(Y, design = as.formula(paste("~", column)), col_data = cells,
              size_factors = cells$size_factor, overdispersion = TRUE, on_disk = FALSE)
glm_gp_seconds <- proc.time()[["elapsed"]] - fit_started

# glmGamPoi names a level's coefficient column+level; rename it to scnbvi's column[level].
beta <- fit$Beta
stopifnot(identical(colnames(beta), c("Intercept", paste0(column, levels[-1]))))
colnames(beta) <- c("Intercept", sprintf("%s[%s]", column, levels[-1]))

dir.create(out_dir, recursive = TRUE, showWarnings = FALSE)
write.table(data.frame(gene = rownames(Y), beta, check.names = FALSE),
            file.path(out_dir, "coefficients.tsv"), sep = "\t", quote = FALSE, row.names = FALSE)
write.table(data.frame(gene = rownames(Y), overdispersion = fit$overdispersions),
            file.path(out_dir, "overdispersions.tsv"), sep = "\t", quote = FALSE, row.names = FALSE)
writeLines(sprintf(
  '{"glm_gp_seconds": %.3f, "total_seconds": %.3f, "n_genes": %d, "n_cells": %d, "glmGamPoi": "%s", "R": "%s"}',
  glm_gp_seconds, proc.time()[["elapsed"]] - started, nrow(Y), ncol(Y),
  as.character(packageVersion("glmGamPoi")), paste(R.version$major, R.version$minor, sep = ".")),
  file.path(out_dir, "timing.json"))
