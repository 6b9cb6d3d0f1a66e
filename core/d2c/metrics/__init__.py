"""Sample quality and speed: the embedded feature nets and the class accuracy (`feature_net`),
FID / IS / KID / precision-recall through stock torch-fidelity (`fidelity`), the metrics that see
fine detail, tokenizer reconstructions included (`detail`), and the speed and hardware parts of
a result record (`speed`)."""
from d2c.metrics.feature_net import (DEFAULT_CACHE_DIR, DETAIL_NET, HELDOUT_SEED, FeatureNet, FeatureNetConfig,
                                     MetricsError, class_accuracy, feature_net_path, load_feature_net)
from d2c.metrics.fidelity import (EMBEDDED_EXTRACTOR, IMAGENET_EXTRACTOR, IMAGENET_FEATURE_DIM, IMAGENET_NUM_SAMPLES,
                                  REFERENCE_SEED, balanced_labels, compute_metrics, feature_stats, fid_vs_statistics,
                                  precision_recall, save_reference_stats)
from d2c.metrics.detail import (detail_metrics, high_pass_energy, radial_power_spectrum, reconstruction_metrics,
                                spectral_distance)
from d2c.metrics.speed import hardware_info, speed_record

__all__ = ["DEFAULT_CACHE_DIR", "DETAIL_NET", "HELDOUT_SEED", "FeatureNet", "FeatureNetConfig", "MetricsError", "class_accuracy",
           "feature_net_path", "load_feature_net", "EMBEDDED_EXTRACTOR", "IMAGENET_EXTRACTOR", "IMAGENET_FEATURE_DIM",
           "IMAGENET_NUM_SAMPLES", "REFERENCE_SEED", "balanced_labels", "compute_metrics", "feature_stats",
           "fid_vs_statistics", "precision_recall", "save_reference_stats", "detail_metrics", "high_pass_energy",
           "radial_power_spectrum", "reconstruction_metrics", "spectral_distance", "hardware_info", "speed_record"]
