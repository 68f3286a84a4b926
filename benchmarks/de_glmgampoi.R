# glmGamPoi's quasi-likelihood test of one contrast, for benchmarks/de_validation.py.
#
# Usage: Rscript benchmarks/de_glmgampoi.R IN_DIR OUT_FILE FORMULA COLUMN NUMERATOR DENOMINATOR
# Needs: apt-get install -y r-bioc-glmgampoi
#
# IN_DIR holds counts.mtx (MatrixMarket, genes x columns), genes.tsv (gene) and columns.tsv (one row
# per column of counts.mtx: the design's columns, and size_factor when the columns are cells; for
# summed samples glmGamPoi's own normed-sum size factors are used). OUT_FILE gets gene, pval,
# adj_pval (Benjamini-Hochberg) and lfc (log2) of NUMERATOR vs DENOMINATOR.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 6) {
  stop("usage: Rscript de_glmgampoi.R IN_DIR OUT_FILE FORMULA COLUMN NUMERATOR DENOMINATOR", call. = FALSE)
}
suppressPackageStartupMessages({
  library(Matrix)
  library(glmGamPoi)
})
columns <- read.delim(file.path(args[[1]], "columns.tsv"), check.names = FALSE, colClasses = "character")
genes <- read.delim(file.path(args[[1]], "genes.tsv"), check.names = FALSE, colClasses = "character")
Y <- as(readMM(file.path(args[[1]], "counts.mtx")), "CsparseMatrix")
rownames(Y) <- genes$gene
column <- args[[4]]
columns[[column]] <- factor(columns[[column]], levels = c(args[[6]], setdiff(sort(unique(columns[[column]])), args[[6]])))
for (name in setdiff(names(columns), c(column, "size_factor"))) columns[[name]] <- factor(columns[[name]])
size_factors <- if ("size_factor" %in% names(columns)) as.numeric(columns$size_factor) else "normed_sum"
fit <- glm_gp(Y, design = as.formula(args[[3]]), col_data = columns, size_factors = size_factors, on_disk = FALSE)
result <- test_de(fit, contrast = paste0(column, args[[5]]))
write.table(data.frame(gene = result$name, pval = result$pval, adj_pval = result$adj_pval, lfc = result$lfc),
            args[[2]], sep = "\t", quote = FALSE, row.names = FALSE)
