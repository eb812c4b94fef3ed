"""Region features of the DnS release: CNN backbones, multi-block region pooling, PCA-whitening."""

from dns_milvus.features.backbones import BACKBONES, Backbone, EfficientNetLite0, ResNet50, build_backbone
from dns_milvus.features.extractor import FeatureExtractor
from dns_milvus.features.pca import PCAWhitening
from dns_milvus.features.region_pooling import RegionPooling, region_pool

__all__ = [
    "BACKBONES",
    "Backbone",
    "EfficientNetLite0",
    "FeatureExtractor",
    "PCAWhitening",
    "RegionPooling",
    "ResNet50",
    "build_backbone",
    "region_pool",
]
