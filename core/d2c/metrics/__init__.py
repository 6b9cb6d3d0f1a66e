"""Sample quality and speed: the embedded feature net and its class accuracy (`feature_net`),
FID / IS / KID / precision-recall through stock torch-fidelity (`fidelity`), and the speed and
hardware parts of a result record (`speed`)."""
from d2c.metrics.feature_net import (DEFAULT_CACHE_DIR, HELDOUT_SEED, FeatureNet, FeatureNetConfig, MetricsError,
                                     class_accuracy, feature_net_path, load_feature_net)
from d2c.metrics.fidelity import (EMBEDDED_EXTRACTOR, IMAGENET_EXTRACTOR, IMAGENET_FEATURE_DIM, IMAGENET_NUM_SAMPLES,
                                  REFERENCE_SEED, balanced_labels, compute_metrics, feature_stats, frechet_distance,
                                  precision_recall, save_reference_stats)
from d2c.metrics.speed import hardware_info, speed_record

__all__ = ["DEFAULT_CACHE_DIR", "HELDOUT_SEED", "FeatureNet", "FeatureNetConfig", "MetricsError", "class_accuracy",
           "feature_net_path", "load_feature_net", "EMBEDDED_EXTRACTOR", "IMAGENET_EXTRACTOR", "IMAGENET_FEATURE_DIM",
           "IMAGENET_NUM_SAMPLES", "REFERENCE_SEED", "balanced_labels", "compute_metrics", "feature_stats",
           "frechet_distance", "precision_recall", "save_reference_stats", "hardware_info", "speed_record"]
